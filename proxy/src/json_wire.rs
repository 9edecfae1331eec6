//! proto3 JSON straight to protobuf wire bytes, driven by descriptors.
//!
//! `--xds-file` documents used to be decoded into prost-reflect `DynamicMessage`s, encoded,
//! and decoded once more into envoy-types: building the dynamic tree was two thirds of a
//! reload of a 20,000-name DNS table. This writes the wire format while the JSON is read,
//! with the proto3 JSON mapping prost-reflect implements (its deserializer stays the
//! reference: the `json_wire` fuzz target compares the two on arbitrary documents), and
//! hands the rare well-known types (Struct, Value, ListValue, Timestamp, FieldMask, Empty)
//! to prost-reflect itself. Types named by an `Any` are looked up through `resolve`, so a
//! pool that loads files on demand ([`crate::descriptors`]) grows as the document needs.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::{Engine, alphabet};
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_reflect::{DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde::de::{self, DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Finds the descriptor of a message by its full name (an `Any`'s type), loading it if
/// need be.
pub type Resolve<'r> = dyn FnMut(&str) -> Option<MessageDescriptor> + 'r;

/// The wire encoding of the message of type `desc` that `de` holds in proto3 JSON.
pub fn transcode<'de, D: Deserializer<'de>>(
    desc: &MessageDescriptor,
    resolve: &mut Resolve<'_>,
    de: D,
) -> Result<Vec<u8>, D::Error> {
    let mut out = Vec::new();
    let mut cx = Cx { resolve, spare: Vec::new() };
    MessageSeed { cx: &mut cx, desc, out: &mut out }.deserialize(de).map_err(|e| {
        // Field paths are built as `.a.b[1]: reason` on the way out; the root has no dot.
        let e = e.to_string();
        D::Error::custom(e.strip_prefix('.').unwrap_or(&e))
    })?;
    Ok(out)
}

/// The wire encoding of a message of type `desc` whose fields are the rest of `map` (the
/// caller has read the keys it needed first, such as an `@type`).
pub fn transcode_fields<'de, A: MapAccess<'de>>(
    desc: &MessageDescriptor,
    resolve: &mut Resolve<'_>,
    map: A,
) -> Result<Vec<u8>, A::Error> {
    let mut out = Vec::new();
    let mut cx = Cx { resolve, spare: Vec::new() };
    FieldsVisitor(MessageSeed { cx: &mut cx, desc, out: &mut out }).visit_map(map).map_err(|e| {
        let e = e.to_string();
        A::Error::custom(e.strip_prefix('.').unwrap_or(&e))
    })?;
    Ok(out)
}

/// What the transcoding of one document shares: the resolver and the buffers nested
/// messages are written into before their length is known.
struct Cx<'a, 'r> {
    resolve: &'a mut Resolve<'r>,
    spare: Vec<Vec<u8>>,
}

impl Cx<'_, '_> {
    fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// Writes `body` as the length-delimited field `number` and keeps the buffer.
    fn put_delimited(&mut self, number: u32, mut body: Vec<u8>, out: &mut Vec<u8>) {
        put_bytes(number, &body, out);
        body.clear();
        self.spare.push(body);
    }
}

fn put_bytes(number: u32, bytes: &[u8], out: &mut Vec<u8>) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn is_well_known(name: &str) -> bool {
    matches!(
        name,
        "google.protobuf.Any"
            | "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.Struct"
            | "google.protobuf.FloatValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.Int32Value"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.FieldMask"
            | "google.protobuf.ListValue"
            | "google.protobuf.Value"
            | "google.protobuf.Empty"
    )
}

/// A message's body (its fields, without key or length).
struct MessageSeed<'c, 'a, 'r> {
    cx: &'c mut Cx<'a, 'r>,
    desc: &'c MessageDescriptor,
    out: &'c mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        let inner = match self.desc.full_name() {
            "google.protobuf.Any" => return de.deserialize_map(AnyVisitor(self)),
            "google.protobuf.Duration" => {
                let (seconds, nanos) = de.deserialize_str(DurationVisitor)?;
                put_scalar(1, &Scalar::I64(seconds), false, self.out);
                put_scalar(2, &Scalar::I32(nanos), false, self.out);
                return Ok(());
            }
            "google.protobuf.DoubleValue" => Some(Kind::Double),
            "google.protobuf.FloatValue" => Some(Kind::Float),
            "google.protobuf.Int64Value" => Some(Kind::Int64),
            "google.protobuf.UInt64Value" => Some(Kind::Uint64),
            "google.protobuf.Int32Value" => Some(Kind::Int32),
            "google.protobuf.UInt32Value" => Some(Kind::Uint32),
            "google.protobuf.BoolValue" => Some(Kind::Bool),
            "google.protobuf.StringValue" => Some(Kind::String),
            "google.protobuf.BytesValue" => Some(Kind::Bytes),
            name if is_well_known(name) => {
                // Struct, Value, ListValue, Timestamp, FieldMask, Empty: rare in Envoy
                // configs, and none holds an Any; prost-reflect's own mapping.
                let msg = DynamicMessage::deserialize_with_options(self.desc.clone(), de, &DeserializeOptions::new())?;
                prost::Message::encode_raw(&msg, self.out);
                return Ok(());
            }
            _ => None,
        };
        match inner {
            // A wrapper is its value, as field 1 (left out when it is the default).
            Some(kind) => {
                let v = scalar(&kind, de)?;
                put_scalar(1, &v, false, self.out);
                Ok(())
            }
            None => de.deserialize_map(FieldsVisitor(self)),
        }
    }
}

/// The fields of an ordinary message, from a JSON object.
struct FieldsVisitor<'c, 'a, 'r>(MessageSeed<'c, 'a, 'r>);

impl<'de> Visitor<'de> for FieldsVisitor<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let MessageSeed { cx, desc, out } = self.0;
        rest_of_fields(cx, desc, out, &mut map, &mut Seen::default())
    }
}

/// The fields of a message from the entries left in `map`.
fn rest_of_fields<'de, A: MapAccess<'de>>(
    cx: &mut Cx<'_, '_>,
    desc: &MessageDescriptor,
    out: &mut Vec<u8>,
    map: &mut A,
    seen: &mut Seen,
) -> Result<(), A::Error> {
    while let Some(field) = map.next_key_seed(FieldKey(desc))? {
        let set = map
            .next_value_seed(FieldSeed { cx: &mut *cx, field: &field, out: &mut *out })
            .map_err(|e| A::Error::custom(in_field(field.json_name(), e)))?;
        if set {
            seen.set(&field).map_err(A::Error::custom)?;
        }
    }
    Ok(())
}

/// Prefixes an error with the field it happened in: `.name.inner[2]: reason`.
fn in_field(name: &str, e: impl fmt::Display) -> String {
    within(&format!(".{name}"), e)
}

/// `e` as it reads after `label` (`.field`, `[index]`, `["key"]`): a path continues it,
/// a reason follows a colon.
fn within(label: &str, e: impl fmt::Display) -> String {
    let e = e.to_string();
    if e.starts_with(['.', '[']) { format!("{label}{e}") } else { format!("{label}: {e}") }
}

/// The fields of one message set so far: a field given twice (under its JSON and its
/// proto name, or twice in a stream) is refused rather than merged, and so is a second
/// member of a oneof, as prost-reflect refuses it.
#[derive(Default)]
struct Seen {
    low: u64,
    high: Vec<u32>,
    oneofs: Vec<String>,
}

impl Seen {
    fn set(&mut self, field: &FieldDescriptor) -> Result<(), String> {
        let n = field.number();
        let again = if n < 64 {
            let bit = 1u64 << n;
            let again = self.low & bit != 0;
            self.low |= bit;
            again
        } else if self.high.contains(&n) {
            true
        } else {
            self.high.push(n);
            false
        };
        if again {
            return Err(format!("field '{}' given twice", field.json_name()));
        }
        let Some(oneof) = field.containing_oneof() else { return Ok(()) };
        if self.oneofs.iter().any(|o| o == oneof.name()) {
            return Err(format!("multiple fields provided for oneof '{}'", oneof.name()));
        }
        self.oneofs.push(oneof.name().to_string());
        Ok(())
    }
}

/// A key of a message's JSON object: the field it names (by JSON or proto name).
struct FieldKey<'c>(&'c MessageDescriptor);

impl<'de> DeserializeSeed<'de> for FieldKey<'_> {
    type Value = FieldDescriptor;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<FieldDescriptor, D::Error> {
        de.deserialize_str(self)
    }
}

impl Visitor<'_> for FieldKey<'_> {
    type Value = FieldDescriptor;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<FieldDescriptor, E> {
        self.0
            .get_field_by_json_name(key)
            .or_else(|| self.0.get_field_by_name(key))
            .ok_or_else(|| E::custom(format!("unrecognized field name '{key}'")))
    }
}

/// One field's value; `true` when it sets the field (JSON `null` leaves it unset).
struct FieldSeed<'c, 'a, 'r> {
    cx: &'c mut Cx<'a, 'r>,
    field: &'c FieldDescriptor,
    out: &'c mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_, '_, '_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<bool, D::Error> {
        de.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_, '_, '_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a value or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        self.visit_none()
    }

    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        let number = self.field.number();
        if self.field.is_list() || self.field.is_map() {
            return Ok(false);
        }
        match self.field.kind() {
            // null is a value of these two: `Value{null_value}` and `NULL_VALUE`.
            Kind::Message(m) if m.full_name() == "google.protobuf.Value" => {
                put_bytes(number, &[0x08, 0x00], self.out);
                Ok(true)
            }
            Kind::Enum(e) if e.full_name() == "google.protobuf.NullValue" => {
                put_scalar(number, &Scalar::Enum(0), self.field.supports_presence(), self.out);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<bool, D::Error> {
        let FieldSeed { cx, field, out } = self;
        if field.is_map() {
            let Kind::Message(entry) = field.kind() else { unreachable!("a map field's kind is its entry") };
            de.deserialize_any(MapVisitor { cx, entry: &entry, number: field.number(), out })?;
        } else if field.is_list() {
            de.deserialize_any(ListVisitor { cx, field, out })?;
        } else {
            put_value(cx, field.number(), &field.kind(), field.supports_presence(), de, out)?;
        }
        Ok(true)
    }
}

/// Writes one value of `kind` as field `number`; a scalar without presence is left out
/// when it is its type's default, as a proto3 encoder does.
fn put_value<'de, D: Deserializer<'de>>(
    cx: &mut Cx<'_, '_>,
    number: u32,
    kind: &Kind,
    presence: bool,
    de: D,
    out: &mut Vec<u8>,
) -> Result<(), D::Error> {
    if let Kind::Message(desc) = kind {
        let mut body = cx.buffer();
        MessageSeed { cx: &mut *cx, desc, out: &mut body }.deserialize(de)?;
        cx.put_delimited(number, body, out);
        return Ok(());
    }
    let v = scalar(kind, de)?;
    put_scalar(number, &v, presence, out);
    Ok(())
}

/// A repeated field: packed scalars in one length-delimited run, everything else one
/// key per element.
struct ListVisitor<'c, 'a, 'r> {
    cx: &'c mut Cx<'a, 'r>,
    field: &'c FieldDescriptor,
    out: &'c mut Vec<u8>,
}

impl<'de> Visitor<'de> for ListVisitor<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        let ListVisitor { cx, field, out } = self;
        let kind = field.kind();
        let number = field.number();
        let packed = field.is_packed();
        let mut run = if packed { cx.buffer() } else { Vec::new() };
        let mut i = 0usize;
        loop {
            let got = if packed {
                seq.next_element_seed(ScalarSeed(&kind)).map(|v| v.map(|v| put_packed(&v, &mut run)))
            } else {
                seq.next_element_seed(ElementSeed { cx: &mut *cx, number, kind: &kind, out: &mut *out })
            };
            match got {
                Ok(Some(())) => i += 1,
                Ok(None) => break,
                Err(e) => return Err(S::Error::custom(within(&format!("[{i}]"), e))),
            }
        }
        if packed {
            if !run.is_empty() {
                cx.put_delimited(number, run, out);
            } else {
                cx.spare.push(run);
            }
        }
        Ok(())
    }
}

/// One element of a repeated field that is not packed (messages, strings, bytes).
struct ElementSeed<'c, 'a, 'r> {
    cx: &'c mut Cx<'a, 'r>,
    number: u32,
    kind: &'c Kind,
    out: &'c mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for ElementSeed<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        put_value(self.cx, self.number, self.kind, true, de, self.out)
    }
}

/// A map field: each JSON entry becomes an entry message `{1: key, 2: value}`.
struct MapVisitor<'c, 'a, 'r> {
    cx: &'c mut Cx<'a, 'r>,
    entry: &'c MessageDescriptor,
    number: u32,
    out: &'c mut Vec<u8>,
}

impl<'de> Visitor<'de> for MapVisitor<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let MapVisitor { cx, entry, number, out } = self;
        let key_kind = entry.map_entry_key_field().kind();
        let value_kind = entry.map_entry_value_field().kind();
        while let Some(key) = map.next_key::<String>()? {
            let mut body = cx.buffer();
            let k = map_key(&key_kind, &key).map_err(A::Error::custom)?;
            put_scalar(1, &k, true, &mut body);
            map.next_value_seed(ElementSeed { cx: &mut *cx, number: 2, kind: &value_kind, out: &mut body })
                .map_err(|e| A::Error::custom(within(&format!("[{key:?}]"), e)))?;
            cx.put_delimited(number, body, out);
        }
        Ok(())
    }
}

fn map_key(kind: &Kind, key: &str) -> Result<Scalar, String> {
    let e = |e: &dyn fmt::Display| e.to_string();
    Ok(match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => typed(kind, Scalar::I32(key.parse().map_err(|x| e(&x))?)),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => typed(kind, Scalar::I64(key.parse().map_err(|x| e(&x))?)),
        Kind::Uint32 | Kind::Fixed32 => typed(kind, Scalar::U32(key.parse().map_err(|x| e(&x))?)),
        Kind::Uint64 | Kind::Fixed64 => typed(kind, Scalar::U64(key.parse().map_err(|x| e(&x))?)),
        Kind::Bool => Scalar::Bool(key.parse().map_err(|x| e(&x))?),
        _ => Scalar::Str(key.to_string()),
    })
}

/// `Any`: `@type` first (or wherever it is: the entries before it are buffered), then
/// either the named message's fields or, for a well-known type, its `value`.
struct AnyVisitor<'c, 'a, 'r>(MessageSeed<'c, 'a, 'r>);

impl<'de> Visitor<'de> for AnyVisitor<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let MessageSeed { cx, out, .. } = self.0;
        let mut buffered: Vec<(String, serde_json::Value)> = Vec::new();
        let type_url: String = loop {
            match map.next_key::<String>()? {
                Some(k) if k == "@type" => break map.next_value()?,
                Some(k) => {
                    let v = map.next_value()?;
                    buffered.push((k, v));
                }
                None => return Err(A::Error::custom("expected '@type' field")),
            }
        };
        let Some((_, name)) = type_url.rsplit_once('/') else {
            return Err(A::Error::custom(format!("unsupported type url '{type_url}': missing at least one '/'")));
        };
        let desc = (cx.resolve)(name).ok_or_else(|| A::Error::custom(format!("message '{name}' not found")))?;
        let mut body = cx.buffer();
        if is_well_known(name) {
            let value = match buffered.iter().position(|(k, _)| k == "value") {
                Some(i) => {
                    let (_, v) = buffered.swap_remove(i);
                    MessageSeed { cx: &mut *cx, desc: &desc, out: &mut body }
                        .deserialize(v)
                        .map_err(|e| A::Error::custom(in_field("value", e)))?;
                    true
                }
                None => false,
            };
            if let Some((k, _)) = buffered.first() {
                return Err(A::Error::custom(format!("unrecognized field name '{k}'")));
            }
            if !value {
                match map.next_key::<String>()? {
                    Some(k) if k == "value" => {
                        map.next_value_seed(MessageSeed { cx: &mut *cx, desc: &desc, out: &mut body })
                            .map_err(|e| A::Error::custom(in_field("value", e)))?;
                    }
                    Some(k) => return Err(A::Error::custom(format!("unrecognized field name '{k}'"))),
                    None => return Err(A::Error::custom("expected 'value' field")),
                }
            }
            if let Some(k) = map.next_key::<String>()? {
                return Err(A::Error::custom(format!("unrecognized field name '{k}'")));
            }
        } else {
            let mut seen = Seen::default();
            for (k, v) in buffered {
                let field = FieldKey(&desc).visit_str::<serde_json::Error>(&k).map_err(A::Error::custom)?;
                let set = FieldSeed { cx: &mut *cx, field: &field, out: &mut body }
                    .deserialize(v)
                    .map_err(|e| A::Error::custom(in_field(field.json_name(), e)))?;
                if set {
                    seen.set(&field).map_err(A::Error::custom)?;
                }
            }
            rest_of_fields(cx, &desc, &mut body, &mut map, &mut seen)?;
        }
        put_bytes(1, type_url.as_bytes(), out);
        if !body.is_empty() {
            cx.put_delimited(2, body, out);
        } else {
            cx.spare.push(body);
        }
        Ok(())
    }
}

/// A scalar as read from JSON, before it is written.
#[derive(Debug)]
enum Scalar {
    F64(f64),
    F32(f32),
    I32(i32),
    I64(i64),
    U32(u32),
    U64(u64),
    /// Zig-zag encoded (`sint32`/`sint64`).
    S64(i64),
    /// Fixed-width (`fixed32`/`sfixed32`, `fixed64`/`sfixed64`).
    X32(u32),
    X64(u64),
    Bool(bool),
    Enum(i32),
    Str(String),
    Bytes(Vec<u8>),
}

/// The scalar of `kind` with the wire form of that kind (`sint`, `fixed`).
fn typed(kind: &Kind, v: Scalar) -> Scalar {
    match (kind, v) {
        (Kind::Sint32, Scalar::I32(x)) => Scalar::S64(x as i64),
        (Kind::Sint64, Scalar::I64(x)) => Scalar::S64(x),
        (Kind::Sfixed32, Scalar::I32(x)) => Scalar::X32(x as u32),
        (Kind::Fixed32, Scalar::U32(x)) => Scalar::X32(x),
        (Kind::Sfixed64, Scalar::I64(x)) => Scalar::X64(x as u64),
        (Kind::Fixed64, Scalar::U64(x)) => Scalar::X64(x),
        (_, v) => v,
    }
}

impl Scalar {
    fn is_default(&self) -> bool {
        match self {
            Scalar::F64(x) => x.to_bits() == 0,
            Scalar::F32(x) => x.to_bits() == 0,
            Scalar::I32(x) | Scalar::Enum(x) => *x == 0,
            Scalar::I64(x) | Scalar::S64(x) => *x == 0,
            Scalar::U32(x) | Scalar::X32(x) => *x == 0,
            Scalar::U64(x) | Scalar::X64(x) => *x == 0,
            Scalar::Bool(x) => !x,
            Scalar::Str(s) => s.is_empty(),
            Scalar::Bytes(b) => b.is_empty(),
        }
    }

    fn wire_type(&self) -> WireType {
        match self {
            Scalar::F64(_) | Scalar::X64(_) => WireType::SixtyFourBit,
            Scalar::F32(_) | Scalar::X32(_) => WireType::ThirtyTwoBit,
            Scalar::Str(_) | Scalar::Bytes(_) => WireType::LengthDelimited,
            _ => WireType::Varint,
        }
    }
}

fn put_scalar(number: u32, v: &Scalar, presence: bool, out: &mut Vec<u8>) {
    if !presence && v.is_default() {
        return;
    }
    encode_key(number, v.wire_type(), out);
    put_packed(v, out);
}

/// A scalar's payload without its key (also an element of a packed run).
fn put_packed(v: &Scalar, out: &mut Vec<u8>) {
    match v {
        Scalar::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Scalar::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        // Negative int32 and enum values are sign-extended to ten bytes, as proto3 says.
        Scalar::I32(x) | Scalar::Enum(x) => encode_varint(*x as i64 as u64, out),
        Scalar::I64(x) => encode_varint(*x as u64, out),
        Scalar::U32(x) => encode_varint(*x as u64, out),
        Scalar::U64(x) => encode_varint(*x, out),
        Scalar::S64(x) => encode_varint(((x << 1) ^ (x >> 63)) as u64, out),
        Scalar::X32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Scalar::X64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Scalar::Bool(x) => out.push(*x as u8),
        Scalar::Str(s) => {
            encode_varint(s.len() as u64, out);
            out.extend_from_slice(s.as_bytes());
        }
        Scalar::Bytes(b) => {
            encode_varint(b.len() as u64, out);
            out.extend_from_slice(b);
        }
    }
}

/// Reads one scalar (any kind but message) of `kind`.
struct ScalarSeed<'c>(&'c Kind);

impl<'de> DeserializeSeed<'de> for ScalarSeed<'_> {
    type Value = Scalar;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Scalar, D::Error> {
        scalar(self.0, de)
    }
}

fn scalar<'de, D: Deserializer<'de>>(kind: &Kind, de: D) -> Result<Scalar, D::Error> {
    let v = match kind {
        Kind::Double => Scalar::F64(de.deserialize_any(Number::<f64>::new())?),
        Kind::Float => Scalar::F32(de.deserialize_any(Number::<f32>::new())?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Scalar::I32(de.deserialize_any(Number::<i32>::new())?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Scalar::I64(de.deserialize_any(Number::<i64>::new())?),
        Kind::Uint32 | Kind::Fixed32 => Scalar::U32(de.deserialize_any(Number::<u32>::new())?),
        Kind::Uint64 | Kind::Fixed64 => Scalar::U64(de.deserialize_any(Number::<u64>::new())?),
        Kind::Bool => Scalar::Bool(de.deserialize_any(BoolVisitor)?),
        Kind::String => Scalar::Str(de.deserialize_string(StringVisitor)?),
        Kind::Bytes => Scalar::Bytes(de.deserialize_str(BytesVisitor)?),
        Kind::Enum(e) if e.full_name() == "google.protobuf.NullValue" => Scalar::Enum(de.deserialize_any(NullVisitor)?),
        Kind::Enum(e) => Scalar::Enum(de.deserialize_any(EnumVisitor(e))?),
        Kind::Message(m) => return Err(D::Error::custom(format!("{} is not a scalar", m.full_name()))),
    };
    Ok(typed(kind, v))
}

/// The numeric types of proto3 JSON: a JSON number or a decimal string; integers also as
/// integral floats (`1e3`), floats also as "NaN", "Infinity", "-Infinity".
trait Num: Sized + Copy + std::str::FromStr<Err: fmt::Display> {
    const WHAT: &'static str;
    fn from_i64(v: i64) -> Result<Self, String>;
    fn from_u64(v: u64) -> Result<Self, String>;
    fn from_f64(v: f64) -> Result<Self, String>;
    fn special(_s: &str) -> Option<Self> {
        None
    }
}

macro_rules! int {
    ($t:ty, $what:literal) => {
        impl Num for $t {
            const WHAT: &'static str = $what;
            fn from_i64(v: i64) -> Result<Self, String> {
                <$t>::try_from(v).map_err(|e| e.to_string())
            }
            fn from_u64(v: u64) -> Result<Self, String> {
                <$t>::try_from(v).map_err(|e| e.to_string())
            }
            fn from_f64(v: f64) -> Result<Self, String> {
                if v.fract() != 0.0 {
                    return Err("expected integer value".into());
                }
                if v < (<$t>::MIN as f64) || v > (<$t>::MAX as f64) {
                    return Err("float value out of range".into());
                }
                Ok(v as $t)
            }
        }
    };
}
int!(i32, "a 32-bit signed integer");
int!(i64, "a 64-bit signed integer or decimal string");
int!(u32, "a 32-bit unsigned integer or decimal string");
int!(u64, "a 64-bit unsigned integer or decimal string");

impl Num for f64 {
    const WHAT: &'static str = "a 64-bit floating point value";
    fn from_i64(v: i64) -> Result<Self, String> {
        Ok(v as f64)
    }
    fn from_u64(v: u64) -> Result<Self, String> {
        Ok(v as f64)
    }
    fn from_f64(v: f64) -> Result<Self, String> {
        Ok(v)
    }
    fn special(s: &str) -> Option<Self> {
        match s {
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => None,
        }
    }
}

impl Num for f32 {
    const WHAT: &'static str = "a 32-bit floating point value";
    fn from_i64(v: i64) -> Result<Self, String> {
        Ok(v as f32)
    }
    fn from_u64(v: u64) -> Result<Self, String> {
        Ok(v as f32)
    }
    fn from_f64(v: f64) -> Result<Self, String> {
        if v < (f32::MIN as f64) || v > (f32::MAX as f64) {
            Err("float value out of range".into())
        } else {
            Ok(v as f32)
        }
    }
    fn special(s: &str) -> Option<Self> {
        f64::special(s).map(|v| v as f32)
    }
}

struct Number<T>(std::marker::PhantomData<T>);

impl<T> Number<T> {
    fn new() -> Self {
        Number(std::marker::PhantomData)
    }
}

impl<T: Num> Visitor<'_> for Number<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::WHAT)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        T::from_i64(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        T::from_u64(v).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        T::from_f64(v).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        match v.parse::<T>() {
            Ok(x) => Ok(x),
            Err(e) => T::special(v).ok_or_else(|| E::custom(e)),
        }
    }
}

struct BoolVisitor;

impl Visitor<'_> for BoolVisitor {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a boolean")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }
}

struct StringVisitor;

impl Visitor<'_> for StringVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
}

struct BytesVisitor;

impl Visitor<'_> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a base64-encoded string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
        // Standard or URL-safe alphabet, padded or not, as proto3 JSON allows.
        const CONFIG: GeneralPurposeConfig = GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent);
        const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, CONFIG);
        const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, CONFIG);
        let mut buf = Vec::new();
        match STANDARD.decode_vec(v, &mut buf) {
            Ok(()) => Ok(buf),
            Err(base64::DecodeError::InvalidByte(_, b'-' | b'_')) => {
                buf.clear();
                URL_SAFE.decode_vec(v, &mut buf).map_err(|e| E::custom(format!("invalid base64: {e}")))?;
                Ok(buf)
            }
            Err(e) => Err(E::custom(format!("invalid base64: {e}"))),
        }
    }
}

struct EnumVisitor<'c>(&'c prost_reflect::EnumDescriptor);

impl Visitor<'_> for EnumVisitor<'_> {
    type Value = i32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a string or integer")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<i32, E> {
        match self.0.get_value_by_name(v) {
            Some(e) => Ok(e.number()),
            None => Err(E::custom(format!("unrecognized enum value '{v}'"))),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i32, E> {
        v.try_into().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i32, E> {
        v.try_into().map_err(E::custom)
    }
}

struct NullVisitor;

impl Visitor<'_> for NullVisitor {
    type Value = i32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "null")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<i32, E> {
        if v == "NULL_VALUE" { Ok(0) } else { Err(E::custom("expected null")) }
    }

    fn visit_unit<E: de::Error>(self) -> Result<i32, E> {
        Ok(0)
    }
}

/// `google.protobuf.Duration`'s JSON: `-?<seconds>(.<up to 9 digits>)?s` (more digits are
/// cut, as prost-types does), within ±10,000 years.
struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = (i64, i32);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a duration string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(i64, i32), E> {
        const MAX_SECONDS: u64 = 315_576_000_000;
        let (seconds, nanos) = parse_duration(v).ok_or_else(|| E::custom("failed to parse duration"))?;
        if seconds.unsigned_abs() > MAX_SECONDS {
            return Err(E::custom("duration out of range"));
        }
        Ok((seconds, nanos))
    }
}

fn parse_duration(s: &str) -> Option<(i64, i32)> {
    if !s.is_ascii() {
        return None;
    }
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n = digits(s);
    let seconds: i64 = s[..n].parse().ok()?;
    let mut s = &s[n..];
    let mut nanos = 0u32;
    if let Some(rest) = s.strip_prefix('.') {
        let n = digits(rest);
        let frac = &rest[..n.min(9)];
        nanos = 10u32.pow(9 - frac.len() as u32) * frac.parse::<u32>().ok()?;
        s = &rest[n..];
    }
    if s != "s" {
        return None;
    }
    Some(if negative { (-seconds, -(nanos as i32)) } else { (seconds, nanos as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptors::Descriptors;
    use prost::Message;
    use serde_json::json;

    /// Ours and prost-reflect's decoding of `json` as `name`, compared as messages.
    fn same_as_reference(name: &str, json: serde_json::Value) -> Result<(), String> {
        let mut d = Descriptors::new();
        let reference = d.from_json(name, &json);
        let desc = d.message(name).unwrap();
        let ours = {
            let mut resolve = |n: &str| d.message(n);
            transcode(&desc, &mut resolve, &json).map_err(|e| e.to_string())
        };
        match (reference, ours) {
            (Ok(r), Ok(bytes)) => {
                // Compared as proto3 JSON of the decoded messages: field order, explicit
                // defaults and the order inside an Any's bytes do not count.
                let ours = d.to_json(name, &bytes).unwrap();
                assert_eq!(ours, d.to_json(name, &r.encode_to_vec()).unwrap(), "{json}");
                Ok(())
            }
            (Err(r), Err(o)) => Err(format!("both refuse: {r} / {o}")),
            (r, o) => panic!("{json}: prost-reflect {r:?}, ours {o:?}"),
        }
    }

    #[test]
    fn a_listener_with_typed_configs_is_what_prost_reflect_makes() {
        let listener = json!({
            "name": "l", "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 8080, "protocol": "UDP"}},
            "perConnectionBufferLimitBytes": 32768, "enableReusePort": false,
            "filterChains": [{
                "filterChainMatch": {"serverNames": ["a", "b"], "destinationPort": 0},
                "filters": [{"name": "tcp", "typedConfig": {
                    "statPrefix": "x", "cluster": "c", "idleTimeout": "1.500s",
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "accessLog": [{"name": "f", "typedConfig": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": "/dev/stdout", "logFormat": {"jsonFormat": {"a": "%START_TIME%", "n": 1.5, "z": null}}}}]}}],
                "transportSocket": {"name": "tls", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "requireClientCertificate": true,
                    "commonTlsContext": {"alpnProtocols": ["kuma"], "tlsParams": {"tlsMinimumProtocolVersion": "TLSv1_2"}}}}}],
            "listenerFilters": [{"name": "dns", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig",
                "statPrefix": "d", "serverConfig": {"inlineDnsTable": {"virtualDomains": [
                    {"name": "a.mesh", "endpoint": {"addressList": {"address": ["240.0.0.1"]}}, "answerTtl": "30s"}]}}}}],
            "metadata": {"filterMetadata": {"io.kuma": {"k": [true, "v", {}]}}},
            "connectionBalanceConfig": {"exactBalance": {}},
            "socketOptions": [{"level": "1", "name": -2, "intValue": "-7", "state": "STATE_LISTENING"}],
        });
        same_as_reference("envoy.config.listener.v3.Listener", listener).unwrap();
    }

    #[test]
    fn scalars_wrappers_maps_and_well_known_types() {
        let cluster = json!({
            "name": "c", "type": "STRICT_DNS", "connectTimeout": "-0.000000001s",
            "perConnectionBufferLimitBytes": 0, "lbPolicy": 3,
            "circuitBreakers": {"thresholds": [{"maxConnections": "1024", "maxRequests": 1e3, "priority": "HIGH"}]},
            "commonLbConfig": {"healthyPanicThreshold": {"value": "NaN"}},
            "typedExtensionProtocolOptions": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicitHttpConfig": {"http2ProtocolOptions": {"maxConcurrentStreams": 100}}}},
            "metadata": {"typedFilterMetadata": {"x": {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "2s"}}},
            "healthChecks": [{"timeout": "1s", "interval": "2s", "unhealthyThreshold": 3, "healthyThreshold": 1,
                "httpHealthCheck": {"path": "/h", "expectedStatuses": [{"start": 200, "end": 300}]}}],
            "dnsResolvers": [],
        });
        same_as_reference("envoy.config.cluster.v3.Cluster", cluster).unwrap();
        let secret = json!({"name": "s", "tlsCertificate": {"privateKey": {"inlineBytes": "aGVsbG8_-w"}}});
        same_as_reference("envoy.extensions.transport_sockets.tls.v3.Secret", secret).unwrap();
    }

    #[test]
    fn refusals_match_prost_reflect_and_name_the_field() {
        let c = "envoy.config.cluster.v3.Cluster";
        for bad in [
            json!({"connectTimeoutz": "1s"}),
            json!({"connectTimeout": "1.s"}),
            json!({"connectTimeout": "315576000001s"}),
            json!({"type": "NOPE"}),
            json!({"perConnectionBufferLimitBytes": -1}),
            json!({"perConnectionBufferLimitBytes": 1.5}),
            json!({"name": 1}),
            json!({"type": "STATIC", "clusterType": {"name": "x"}}),
            json!({"loadAssignment": {"endpoints": [{}, {"lbEndpoints": [{"endpoint": {"addresz": 1}}]}]}}),
            json!({"transportSocket": {"typedConfig": {"@type": "type.googleapis.com/envoy.Nope"}}}),
            json!({"transportSocket": {"typedConfig": {"name": "x"}}}),
            json!({"metadata": {"typedFilterMetadata": {"x": {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "2s", "more": 1}}}}),
        ] {
            same_as_reference(c, bad).unwrap_err();
        }
        let mut d = Descriptors::new();
        let desc = d.message(c).unwrap();
        let mut resolve = |n: &str| d.message(n);
        let bad = json!({"loadAssignment": {"endpoints": [{}, {"lbEndpoints": [{"endpoint": {"addresz": 1}}]}]}});
        let e = transcode(&desc, &mut resolve, &bad).unwrap_err().to_string();
        assert_eq!(e, "loadAssignment.endpoints[1].lbEndpoints[0].endpoint: unrecognized field name 'addresz'");
    }

    #[test]
    fn durations_parse_as_prost_types_does() {
        assert_eq!(parse_duration("1.5s"), Some((1, 500_000_000)));
        assert_eq!(parse_duration("-0.5s"), Some((0, -500_000_000)));
        assert_eq!(parse_duration("2.1234567891s"), Some((2, 123_456_789)));
        assert_eq!(parse_duration("3s"), Some((3, 0)));
        for bad in ["1.s", "+1s", "1", "s", "1.5ms", "1e3s", "١s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
