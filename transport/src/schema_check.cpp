#include "schema_check.hpp"

#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace shoal::transport::detail {

namespace {

struct struct_plan;

// What reading one pointer of a given type must check.
struct type_check {
  enum class kind : std::uint8_t { text, data, structure, primitive_list, pointer_list, struct_list };
  kind what;
  capnp::ListSchema list{};            // Lists: reading through it checks the element size.
  const struct_plan* plan = nullptr;   // structure, struct_list: the (element) struct's plan.
  const type_check* inner = nullptr;   // pointer_list: each element's check; null: none.
};

struct pointer_check {
  std::uint32_t index;  // In the struct's pointer section.
  const type_check* type;
};

struct member_check {
  std::uint16_t discriminant;
  std::vector<pointer_check> pointers;  // A pointer member's check.
  const struct_plan* group = nullptr;   // A group member: its fields live in the same sections.
};

struct struct_plan {
  std::vector<pointer_check> pointers;     // Non-union pointer fields that need a check.
  std::vector<const struct_plan*> groups;  // Non-union groups.
  bool has_union = false;
  std::uint32_t discriminant_offset = 0;   // In 16-bit units of the data section.
  std::vector<member_check> members;       // Union members that need a check.
};

// Plans of every struct reachable from the schemas asked about; only ever grows, and plans
// never move (deques), so a plan handed out stays valid.
class plan_set {
 public:
  const struct_plan& plan(capnp::StructSchema schema) {
    std::lock_guard lock(mutex_);
    return *plan_of(schema);
  }

 private:
  const struct_plan* plan_of(capnp::StructSchema schema) {
    const auto id = schema.getProto().getId();
    if (auto it = by_id_.find(id); it != by_id_.end()) return it->second;
    struct_plan* plan = &structs_.emplace_back();
    by_id_.emplace(id, plan);  // Before the fields: a struct may contain itself.
    const auto proto = schema.getProto().getStruct();
    plan->has_union = proto.getDiscriminantCount() > 0;
    plan->discriminant_offset = proto.getDiscriminantOffset();
    for (auto field : schema.getFields()) {
      const auto field_proto = field.getProto();
      const struct_plan* group = nullptr;
      std::vector<pointer_check> pointers;
      if (field_proto.isGroup()) {
        group = plan_of(field.getType().asStruct());
      } else if (const type_check* check = check_of(field.getType())) {
        pointers.push_back({field_proto.getSlot().getOffset(), check});
      }
      if (field_proto.getDiscriminantValue() == capnp::schema::Field::NO_DISCRIMINANT) {
        if (group != nullptr) plan->groups.push_back(group);
        plan->pointers.insert(plan->pointers.end(), pointers.begin(), pointers.end());
      } else if (group != nullptr || !pointers.empty()) {
        plan->members.push_back({field_proto.getDiscriminantValue(), std::move(pointers), group});
      }
    }
    return plan;
  }

  // Null for what needs no check: data fields, AnyPointer and capabilities (as in the
  // reference walk).
  const type_check* check_of(capnp::Type type) {
    using which = capnp::schema::Type::Which;
    switch (type.which()) {
      case which::TEXT: return &types_.emplace_back(type_check{type_check::kind::text});
      case which::DATA: return &types_.emplace_back(type_check{type_check::kind::data});
      case which::STRUCT: {
        auto& check = types_.emplace_back(type_check{type_check::kind::structure});
        check.plan = plan_of(type.asStruct());
        return &check;
      }
      case which::LIST: {
        const auto list = type.asList();
        const auto element = list.getElementType();
        auto make = [&](type_check::kind what) -> type_check& {
          auto& check = types_.emplace_back(type_check{what});
          check.list = list;
          return check;
        };
        switch (element.which()) {
          // Data elements are not read, as in the reference walk: any bytes are valid data.
          case which::DATA:
            return &make(type_check::kind::pointer_list);
          case which::TEXT:
          case which::LIST: {
            auto& check = make(type_check::kind::pointer_list);
            check.inner = check_of(element);
            return &check;
          }
          case which::STRUCT: {
            auto& check = make(type_check::kind::struct_list);
            check.plan = plan_of(element.asStruct());
            return &check;
          }
          case which::ANY_POINTER:
          case which::INTERFACE:
            return &make(type_check::kind::pointer_list);
          default:
            return &make(type_check::kind::primitive_list);
        }
      }
      default:
        return nullptr;
    }
  }

  std::mutex mutex_;
  std::deque<struct_plan> structs_;
  std::deque<type_check> types_;
  std::unordered_map<std::uint64_t, const struct_plan*> by_id_;
};

void check_struct(capnp::AnyStruct::Reader value, const struct_plan& plan);

void check_pointer(capnp::AnyPointer::Reader pointer, const type_check& check) {
  switch (check.what) {
    case type_check::kind::text:
      (void)pointer.getAs<capnp::Text>();
      break;
    case type_check::kind::data:
      (void)pointer.getAs<capnp::Data>();
      break;
    case type_check::kind::structure:
      check_struct(pointer.getAs<capnp::AnyStruct>(), *check.plan);
      break;
    case type_check::kind::struct_list: {
      capnp::AnyList::Reader list = pointer.getAs<capnp::DynamicList>(check.list);
      for (auto element : list.as<capnp::List<capnp::AnyStruct>>()) check_struct(element, *check.plan);
      break;
    }
    case type_check::kind::pointer_list: {
      capnp::AnyList::Reader list = pointer.getAs<capnp::DynamicList>(check.list);
      if (check.inner != nullptr)
        for (auto element : list.as<capnp::List<capnp::AnyPointer>>()) check_pointer(element, *check.inner);
      break;
    }
    case type_check::kind::primitive_list:
      // Primitive elements need no check beyond the element size and the bounds.
      (void)pointer.getAs<capnp::DynamicList>(check.list);
      break;
  }
}

void check_pointers(capnp::AnyStruct::Reader value, const std::vector<pointer_check>& pointers) {
  const auto section = value.getPointerSection();
  // A pointer beyond the section (an older sender's smaller struct) reads as its default.
  for (const auto& p : pointers)
    if (p.index < section.size()) check_pointer(section[p.index], *p.type);
}

void check_struct(capnp::AnyStruct::Reader value, const struct_plan& plan) {
  check_pointers(value, plan.pointers);
  for (const auto* group : plan.groups) check_struct(value, *group);
  if (!plan.has_union || plan.members.empty()) return;
  const auto data = value.getDataSection();
  std::uint16_t which = 0;  // Beyond the data section: the default, 0.
  if ((plan.discriminant_offset + 1) * sizeof(which) <= data.size())
    std::memcpy(&which, data.begin() + plan.discriminant_offset * sizeof(which), sizeof(which));
  for (const auto& member : plan.members) {
    if (member.discriminant != which) continue;
    check_pointers(value, member.pointers);
    if (member.group != nullptr) check_struct(value, *member.group);
    return;
  }
}

void check_value(const capnp::DynamicValue::Reader& value);

void check_dynamic_struct(capnp::DynamicStruct::Reader value) {
  for (auto field : value.getSchema().getNonUnionFields()) check_value(value.get(field));
  KJ_IF_MAYBE(field, value.which()) { check_value(value.get(*field)); }
}

void check_value(const capnp::DynamicValue::Reader& value) {
  switch (value.getType()) {
    case capnp::DynamicValue::TEXT:
      (void)value.as<capnp::Text>();
      break;
    case capnp::DynamicValue::STRUCT:
      check_dynamic_struct(value.as<capnp::DynamicStruct>());
      break;
    case capnp::DynamicValue::LIST: {
      auto list = value.as<capnp::DynamicList>();
      auto element = list.getSchema().whichElementType();
      // Primitive elements need no check beyond the bounds already verified.
      if (element == capnp::schema::Type::TEXT || element == capnp::schema::Type::STRUCT ||
          element == capnp::schema::Type::LIST) {
        for (auto item : list) check_value(item);
      }
      break;
    }
    default:
      break;
  }
}

}  // namespace

void check_fields(capnp::AnyStruct::Reader value, capnp::StructSchema schema) {
  // Schemas are compiled in, so the set stays small; one per process, shared by every node.
  static plan_set plans;
  check_struct(value, plans.plan(schema));
}

void check_fields_reference(capnp::DynamicStruct::Reader value) { check_dynamic_struct(value); }

}  // namespace shoal::transport::detail
