//! A visit of every node of a parse tree, through the tree's `Serialize`
//! implementation (`pg_query`'s protobuf types derive it): no part of the
//! grammar can be missed by a visitor, whatever its type.

use serde::ser::{self, Impossible, Serialize};

/// What a visit of the tree is told, in the tree's order.
pub(super) trait Visitor {
    /// A struct (a node, or a part of one) begins: its fields follow, each
    /// named by [`Visitor::field`] before its value.
    fn begin_struct(&mut self, name: &'static str);
    /// The next value is the field `key` of the innermost struct.
    fn field(&mut self, key: &'static str);
    fn end_struct(&mut self);
    fn string(&mut self, _value: &str) {}
    fn boolean(&mut self, _value: bool) {}
    /// An absent optional value.
    fn none(&mut self) {}
}

/// Visits every struct, field, string and boolean of `tree` in order.
pub(super) fn visit<V: Visitor>(tree: &impl Serialize, visitor: &mut V) {
    // Never fails: every method of the serializer returns Ok.
    let _ = tree.serialize(&mut Tree(visitor));
}

struct Tree<'a, V>(&'a mut V);

// The tree pass is a serde `Serializer` that serializes nothing: it only
// follows the structs, fields, sequences and options of the tree.

/// Never produced: every method succeeds.
#[derive(Debug)]
struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl std::error::Error for Never {}

impl ser::Error for Never {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Never
    }
}

macro_rules! ignore {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, _: $ty) -> Result<(), Never> { Ok(()) })*
    };
}

impl<V: Visitor> ser::Serializer for &mut Tree<'_, V> {
    type Ok = ();
    type Error = Never;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Impossible<(), Never>;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    ignore!(
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    fn serialize_bool(self, v: bool) -> Result<(), Never> {
        self.0.boolean(v);
        Ok(())
    }

    fn serialize_str(self, v: &str) -> Result<(), Never> {
        self.0.string(v);
        Ok(())
    }

    fn serialize_none(self) -> Result<(), Never> {
        self.0.none();
        Ok(())
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), Never> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Never> {
        Ok(())
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Never> {
        Ok(())
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Never> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), Never> {
        value.serialize(self)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self, Never> {
        Ok(self)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self, Never> {
        Ok(self)
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Never> {
        Ok(self)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Never> {
        Ok(self)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Never> {
        // The parse tree has no maps.
        Err(Never)
    }

    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Self, Never> {
        self.0.begin_struct(name);
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self, Never> {
        self.0.begin_struct(variant);
        Ok(self)
    }
}

/// The compound parts of the tree: each element or field is visited in
/// turn; a struct's fields are named first (see [`Visitor::field`]).
macro_rules! compound {
    ($($trait:ident :: $method:ident),* $(,)?) => {$(
        impl<V: Visitor> ser::$trait for &mut Tree<'_, V> {
            type Ok = ();
            type Error = Never;
            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Never> {
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), Never> {
                Ok(())
            }
        }
    )*};
}

compound!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

macro_rules! structure {
    ($($trait:ident),* $(,)?) => {$(
        impl<V: Visitor> ser::$trait for &mut Tree<'_, V> {
            type Ok = ();
            type Error = Never;
            fn serialize_field<T: ?Sized + Serialize>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), Never> {
                self.0.field(key);
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), Never> {
                self.0.end_struct();
                Ok(())
            }
        }
    )*};
}

structure!(SerializeStruct, SerializeStructVariant);
