#include "shoal/transport/node.hpp"
