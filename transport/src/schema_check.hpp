#pragma once
// Reading every pointer field of a message the way its schema declares it, so that the checks
// Cap'n Proto performs lazily (text ends in NUL, a pointer has the declared kind, list elements
// the declared size) fail in the decoder rather than later in an actor. Both functions throw
// kj::Exception on the first field that fails; bounds and amplification are limited by the
// reader's options.

#include <capnp/any.h>
#include <capnp/dynamic.h>
#include <capnp/schema.h>

namespace shoal::transport::detail {

/// Checks `value` as a struct of `schema` with a plan computed once per schema (about 0.5 us
/// for a heartbeat envelope, where the dynamic walk takes 3-4 us).
void check_fields(capnp::AnyStruct::Reader value, capnp::StructSchema schema);

/// The same checks through Cap'n Proto's dynamic API, field by field: the plain reference
/// that tests compare `check_fields` with.
void check_fields_reference(capnp::DynamicStruct::Reader value);

}  // namespace shoal::transport::detail
