//! Building blocks shared by [`super::decode`] and [`super::encode`] (this module is declared from
//! `decode.rs`): the variable byte integer, a bounds-checked reader over a received frame, a byte
//! sink that either writes or only counts, and the MQTT 5 property codec.

pub(crate) mod properties;
pub(crate) mod reader;
pub(crate) mod varint;
pub(crate) mod writer;
