//! serde integration: typed payload structs to and from [`Value`] without loss.
//!
//! [`to_value`] and [`from_value`] convert between any serde type and [`Value`] directly
//! (no detour through `serde_json`, which would round integers beyond 64 bits). A `Value`
//! field inside a typed struct (for example a `#[serde(flatten)] extra: Map` that keeps
//! unknown fields) holds big integers exactly: they travel through serde as a one-entry map
//! under a private key, the same trick `serde_json` uses for arbitrary precision.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};
use serde::ser::{self, Serialize, SerializeMap, SerializeSeq, Serializer};

use super::value::{Map, N, Number, Value};

/// The private key carrying an exact big integer through serde's data model.
pub(crate) const BIG_INT_TOKEN: &str = "$pdsno::json::BigInt";

/// A conversion error between [`Value`] and a typed structure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// Converts a serde type into a [`Value`].
///
/// # Errors
/// When the type produces something JSON cannot represent (a non-string map key, a
/// non-finite float).
pub fn to_value<T: Serialize + ?Sized>(t: &T) -> Result<Value, Error> {
    t.serialize(ValueSerializer)
}

/// Converts a [`Value`] into a serde type.
///
/// # Errors
/// When the value does not have the shape the type requires; the message names the field.
pub fn from_value<T: de::DeserializeOwned>(v: Value) -> Result<T, Error> {
    T::deserialize(v)
}

// ---------------------------------------------------------------------------------------
// Value as a serde data format participant

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Number(n) => match &n.0 {
                N::Int(i) => s.serialize_i64(*i),
                N::Float(f) => s.serialize_f64(*f),
                N::Big(text) => {
                    let mut m = s.serialize_map(Some(1))?;
                    m.serialize_entry(BIG_INT_TOKEN, &**text)?;
                    m.end()
                }
            },
            Value::String(st) => s.serialize_str(st),
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for item in a {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Object(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::from(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(Value::from(u))
    }
    fn visit_i128<E>(self, i: i128) -> Result<Value, E> {
        Ok(Value::Number(Number::from_i128(i)))
    }
    fn visit_u128<E>(self, u: u128) -> Result<Value, E> {
        Ok(Value::Number(
            Number::from_integer_text(&u.to_string()).unwrap_or(Number::from_i64(0)),
        ))
    }
    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite float"))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize_from(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(v) = seq.next_element::<Value>()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(k) = access.next_key::<String>()? {
            if k == BIG_INT_TOKEN && map.is_empty() {
                let text: String = access.next_value()?;
                let n = Number::from_integer_text(&text)
                    .ok_or_else(|| de::Error::custom("malformed big integer"))?;
                // A genuine big-int carrier has exactly one entry.
                if access.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("malformed big integer"));
                }
                return Ok(Value::Number(n));
            }
            let v: Value = access.next_value()?;
            if map.insert(k.clone(), v).is_some() {
                return Err(de::Error::custom(format!("duplicate key {k:?}")));
            }
        }
        Ok(Value::Object(map))
    }
}

impl Value {
    fn deserialize_from<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

impl<'de> de::Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        Value::deserialize_from(d)
    }
}

// ---------------------------------------------------------------------------------------
// Value as a Deserializer (from_value)

struct SeqDeser(std::vec::IntoIter<Value>);

impl<'de> SeqAccess<'de> for SeqDeser {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.0.next() {
            Some(v) => seed.deserialize(v).map(Some),
            None => Ok(None),
        }
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct MapDeser {
    iter: std::collections::btree_map::IntoIter<String, Value>,
    pending: Option<Value>,
}

impl<'de> MapAccess<'de> for MapDeser {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.iter.next() {
            Some((k, v)) => {
                self.pending = Some(v);
                seed.deserialize(k.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.pending.take() {
            Some(v) => seed.deserialize(v),
            None => Err(Error("value requested before key".into())),
        }
    }
}

struct BigIntDeser(Option<Box<str>>);

impl<'de> MapAccess<'de> for BigIntDeser {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if self.0.is_some() {
            seed.deserialize(BIG_INT_TOKEN.into_deserializer())
                .map(Some)
        } else {
            Ok(None)
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.0.take() {
            Some(t) => seed.deserialize(String::from(t).into_deserializer()),
            None => Err(Error("value requested before key".into())),
        }
    }
}

struct EnumDeser {
    variant: String,
    content: Option<Value>,
}

impl<'de> EnumAccess<'de> for EnumDeser {
    type Error = Error;
    type Variant = VariantDeser;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, VariantDeser), Error> {
        let v = seed.deserialize(self.variant.into_deserializer())?;
        Ok((v, VariantDeser(self.content)))
    }
}

struct VariantDeser(Option<Value>);

impl<'de> VariantAccess<'de> for VariantDeser {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        match self.0 {
            None | Some(Value::Null) => Ok(()),
            Some(v) => Err(Error(format!(
                "expected a unit variant, found {}",
                v.kind()
            ))),
        }
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self.0.unwrap_or(Value::Null))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.0.unwrap_or(Value::Null).deserialize_seq(visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.0.unwrap_or(Value::Null).deserialize_map(visitor)
    }
}

impl<'de> IntoDeserializer<'de, Error> for Value {
    type Deserializer = Value;
    fn into_deserializer(self) -> Value {
        self
    }
}

impl<'de> Deserializer<'de> for Value {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(Number(N::Int(i))) => visitor.visit_i64(i),
            Value::Number(Number(N::Float(f))) => visitor.visit_f64(f),
            Value::Number(Number(N::Big(t))) => visitor.visit_map(BigIntDeser(Some(t))),
            Value::String(s) => visitor.visit_string(s),
            Value::Array(a) => visitor.visit_seq(SeqDeser(a.into_iter())),
            Value::Object(m) => visitor.visit_map(MapDeser {
                iter: m.into_iter(),
                pending: None,
            }),
        }
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self {
            Value::Number(n) if n.as_u64().is_some() => {
                visitor.visit_u64(n.as_u64().unwrap_or_default())
            }
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self {
            Value::Number(n) if n.as_i128().is_some() => {
                visitor.visit_i128(n.as_i128().unwrap_or_default())
            }
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self {
            Value::Number(n) if n.is_integer() => {
                match n.big_integer_text().unwrap_or("").parse::<u128>() {
                    Ok(u) => visitor.visit_u128(u),
                    Err(_) => self.deserialize_any(visitor),
                }
            }
            _ => self.deserialize_any(visitor),
        }
    }

    // A big integer travels as a one-entry map only to a `Value`; a struct or a map asked
    // of one is a type error, not a map holding the carrier key.
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Value::Number(Number(N::Big(_))) => {
                Err(Error("expected an object, found a number".into()))
            }
            other => other.deserialize_any(visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self {
            Value::String(variant) => visitor.visit_enum(EnumDeser {
                variant,
                content: None,
            }),
            Value::Object(m) if m.len() == 1 => {
                let Some((variant, content)) = m.into_iter().next() else {
                    return Err(Error("empty enum object".into()));
                };
                visitor.visit_enum(EnumDeser {
                    variant,
                    content: Some(content),
                })
            }
            other => Err(Error(format!(
                "expected a string or a one-key object for an enum, found {}",
                other.kind()
            ))),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 u8 u16 u32 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple
        tuple_struct identifier ignored_any
    }
}

// ---------------------------------------------------------------------------------------
// A Serializer producing Value (to_value)

struct ValueSerializer;

/// Collects a sequence.
struct SeqSer(Vec<Value>);
/// Collects a map or struct.
struct MapSer {
    map: Map,
    key: Option<String>,
}
/// Collects a tuple or struct variant as `{variant: content}`.
struct VariantSer<T> {
    variant: &'static str,
    inner: T,
}

impl Serializer for ValueSerializer {
    type Ok = Value;
    type Error = Error;
    type SerializeSeq = SeqSer;
    type SerializeTuple = SeqSer;
    type SerializeTupleStruct = SeqSer;
    type SerializeTupleVariant = VariantSer<SeqSer>;
    type SerializeMap = MapSer;
    type SerializeStruct = MapSer;
    type SerializeStructVariant = VariantSer<MapSer>;

    fn serialize_bool(self, v: bool) -> Result<Value, Error> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, Error> {
        Ok(Value::from(i64::from(v)))
    }
    fn serialize_i16(self, v: i16) -> Result<Value, Error> {
        Ok(Value::from(i64::from(v)))
    }
    fn serialize_i32(self, v: i32) -> Result<Value, Error> {
        Ok(Value::from(i64::from(v)))
    }
    fn serialize_i64(self, v: i64) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_i128(self, v: i128) -> Result<Value, Error> {
        Ok(Value::Number(Number::from_i128(v)))
    }
    fn serialize_u8(self, v: u8) -> Result<Value, Error> {
        Ok(Value::from(i64::from(v)))
    }
    fn serialize_u16(self, v: u16) -> Result<Value, Error> {
        Ok(Value::from(i64::from(v)))
    }
    fn serialize_u32(self, v: u32) -> Result<Value, Error> {
        Ok(Value::from(i64::from(v)))
    }
    fn serialize_u64(self, v: u64) -> Result<Value, Error> {
        Ok(Value::from(v))
    }
    fn serialize_u128(self, v: u128) -> Result<Value, Error> {
        Number::from_integer_text(&v.to_string())
            .map(Value::Number)
            .ok_or_else(|| Error("bad u128".into()))
    }
    fn serialize_f32(self, v: f32) -> Result<Value, Error> {
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, Error> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| Error("JSON cannot carry NaN or infinity".into()))
    }
    fn serialize_char(self, v: char) -> Result<Value, Error> {
        Ok(Value::String(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, Error> {
        Ok(Value::String(v.to_owned()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, Error> {
        Ok(Value::Array(
            v.iter().map(|b| Value::from(i64::from(*b))).collect(),
        ))
    }
    fn serialize_none(self) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<Value, Error> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, Error> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Value, Error> {
        Ok(Value::String(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        v: &T,
    ) -> Result<Value, Error> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<Value, Error> {
        let mut m = Map::new();
        m.insert(variant.to_owned(), v.serialize(ValueSerializer)?);
        Ok(Value::Object(m))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqSer, Error> {
        Ok(SeqSer(Vec::with_capacity(len.unwrap_or(0).min(1024))))
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqSer, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<SeqSer, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSer<SeqSer>, Error> {
        Ok(VariantSer {
            variant,
            inner: self.serialize_seq(Some(len))?,
        })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<MapSer, Error> {
        Ok(MapSer {
            map: Map::new(),
            key: None,
        })
    }
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<MapSer, Error> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSer<MapSer>, Error> {
        Ok(VariantSer {
            variant,
            inner: self.serialize_map(Some(len))?,
        })
    }
}

impl ser::SerializeSeq for SeqSer {
    type Ok = Value;
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        self.0.push(v.serialize(ValueSerializer)?);
        Ok(())
    }
    fn end(self) -> Result<Value, Error> {
        Ok(Value::Array(self.0))
    }
}

impl ser::SerializeTuple for SeqSer {
    type Ok = Value;
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        ser::SerializeSeq::serialize_element(self, v)
    }
    fn end(self) -> Result<Value, Error> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for SeqSer {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        ser::SerializeSeq::serialize_element(self, v)
    }
    fn end(self) -> Result<Value, Error> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleVariant for VariantSer<SeqSer> {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        ser::SerializeSeq::serialize_element(&mut self.inner, v)
    }
    fn end(self) -> Result<Value, Error> {
        let mut m = Map::new();
        m.insert(self.variant.to_owned(), ser::SerializeSeq::end(self.inner)?);
        Ok(Value::Object(m))
    }
}

impl ser::SerializeMap for MapSer {
    type Ok = Value;
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        match key.serialize(ValueSerializer)? {
            Value::String(s) => {
                self.key = Some(s);
                Ok(())
            }
            other => Err(Error(format!(
                "JSON object keys must be strings, not {}",
                other.kind()
            ))),
        }
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        let key = self
            .key
            .take()
            .ok_or_else(|| Error("value serialized before its key".into()))?;
        let value = v.serialize(ValueSerializer)?;
        if key == BIG_INT_TOKEN
            && self.map.is_empty()
            && let Value::String(text) = &value
            && let Some(n) = Number::from_integer_text(text)
        {
            // Re-assemble a big integer that came through serde as its carrier map.
            self.map.insert(key, Value::Number(n));
            return Ok(());
        }
        self.map.insert(key, value);
        Ok(())
    }
    fn end(self) -> Result<Value, Error> {
        if self.map.len() == 1
            && let Some(Value::Number(n)) = self.map.get(BIG_INT_TOKEN)
        {
            return Ok(Value::Number(n.clone()));
        }
        Ok(Value::Object(self.map))
    }
}

impl ser::SerializeStruct for MapSer {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        self.map
            .insert(key.to_owned(), v.serialize(ValueSerializer)?);
        Ok(())
    }
    fn end(self) -> Result<Value, Error> {
        Ok(Value::Object(self.map))
    }
}

impl ser::SerializeStructVariant for VariantSer<MapSer> {
    type Ok = Value;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        ser::SerializeStruct::serialize_field(&mut self.inner, key, v)
    }
    fn end(self) -> Result<Value, Error> {
        let mut m = Map::new();
        m.insert(self.variant.to_owned(), Value::Object(self.inner.map));
        Ok(Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Typed {
        name: String,
        count: u32,
        ratio: f64,
        tag: Option<String>,
        #[serde(flatten)]
        extra: Map,
    }

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    struct AllDefault {
        #[serde(default)]
        name: String,
        #[serde(flatten)]
        extra: Map,
    }

    #[test]
    fn a_big_integer_is_not_an_object() {
        // Found by fuzzing: a bare 32-digit number decoded as a struct whose fields all
        // have defaults, the carrier key landing in `extra`.
        let v = crate::json::parse(b"55555555555555555555555555555555").expect("valid");
        assert!(from_value::<AllDefault>(v.clone()).is_err());
        assert!(from_value::<Map>(v.clone()).is_err());
        // As a `Value` it stays the exact number.
        let back: Value = from_value(v.clone()).expect("value");
        assert_eq!(back, v);
    }

    #[test]
    fn unknown_fields_survive_a_typed_round_trip_exactly() {
        let v = crate::json::parse(
            br#"{"name":"x","count":3,"ratio":1.0,"tag":null,"big":123456789012345678901234567890,"f":1e+16,"nested":{"k":[1,2.5]}}"#,
        )
        .expect("valid");
        let t: Typed = from_value(v.clone()).expect("typed");
        assert_eq!(t.count, 3);
        assert_eq!(t.extra.len(), 3);
        let back = to_value(&t).expect("value");
        assert_eq!(back, v);
        assert_eq!(back.to_string(), v.to_string());
    }

    #[test]
    fn type_errors_name_the_problem() {
        let v =
            crate::json::parse(br#"{"name":5,"count":3,"ratio":1.0,"tag":null}"#).expect("valid");
        let e = from_value::<Typed>(v).expect_err("wrong type");
        assert!(e.to_string().contains("invalid type"), "{e}");
        let v = crate::json::parse(br#"{"name":"x","ratio":1.0}"#).expect("valid");
        let e = from_value::<Typed>(v).expect_err("missing");
        assert!(e.to_string().contains("count"), "{e}");
    }

    #[test]
    fn enums_and_big_values() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        enum Status {
            Approved,
            Rejected,
        }
        let s: Status = from_value(Value::from("REJECTED")).expect("enum");
        assert_eq!(s, Status::Rejected);
        assert_eq!(
            to_value(&Status::Approved).expect("v"),
            Value::from("APPROVED")
        );
        let u: u64 = from_value(Value::from(u64::MAX)).expect("u64");
        assert_eq!(u, u64::MAX);
        assert!(from_value::<u8>(Value::from(300i64)).is_err());
    }
}
