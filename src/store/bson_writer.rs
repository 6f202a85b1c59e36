//! A BSON document written straight into one buffer, for the documents built per letter (its
//! insert, its outcome). Written by hand because the `bson` crate's way to build raw documents,
//! `RawDocumentBuf::append`, took ~390 instructions a field under callgrind (it checks each key
//! for NUL char by char, extends byte by byte and rewrites the length after every field), and a
//! letter's insert and outcome have ~40 fields together (issue 23). Here a field is its bytes.
//! The result is a `RawDocumentBuf`, checked by the `bson` crate, and the tests hold the bytes to
//! what that crate writes.

use mongodb::bson::{DateTime, RawDocumentBuf, oid::ObjectId};

/// BSON element types (bsonspec.org).
const DOUBLE: u8 = 0x01;
const STRING: u8 = 0x02;
const DOCUMENT: u8 = 0x03;
const ARRAY: u8 = 0x04;
const OBJECT_ID: u8 = 0x07;
const BOOLEAN: u8 = 0x08;
const DATE_TIME: u8 = 0x09;
const INT32: u8 = 0x10;
const INT64: u8 = 0x12;

/// A document being written; nested documents and arrays are opened and closed in order.
pub struct DocWriter {
    buf: Vec<u8>,
    /// Where each open document's length goes.
    open: Vec<usize>,
}

impl DocWriter {
    /// A document of about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> DocWriter {
        let mut writer = DocWriter { buf: Vec::with_capacity(capacity.max(16)), open: Vec::with_capacity(4) };
        writer.start();
        writer
    }

    fn start(&mut self) {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&[0; 4]);
    }

    /// A field's type and name. Names are the service's own, or checked by the caller: a NUL
    /// in one would end it early.
    fn key(&mut self, kind: u8, key: &str) {
        debug_assert!(!key.contains('\0'), "a BSON key cannot hold NUL: {key:?}");
        self.buf.push(kind);
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.push(0);
    }

    pub fn str(&mut self, key: &str, value: &str) {
        self.key(STRING, key);
        self.string_value(value);
    }

    fn string_value(&mut self, value: &str) {
        self.buf.extend_from_slice(&(value.len() as i32 + 1).to_le_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
    }

    pub fn i32(&mut self, key: &str, value: i32) {
        self.key(INT32, key);
        self.buf.extend_from_slice(&value.to_le_bytes());
    }

    pub fn i64(&mut self, key: &str, value: i64) {
        self.key(INT64, key);
        self.buf.extend_from_slice(&value.to_le_bytes());
    }

    pub fn f64(&mut self, key: &str, value: f64) {
        self.key(DOUBLE, key);
        self.buf.extend_from_slice(&value.to_le_bytes());
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(BOOLEAN, key);
        self.buf.push(u8::from(value));
    }

    pub fn object_id(&mut self, key: &str, value: ObjectId) {
        self.key(OBJECT_ID, key);
        self.buf.extend_from_slice(&value.bytes());
    }

    pub fn date_time(&mut self, key: &str, value: DateTime) {
        self.key(DATE_TIME, key);
        self.buf.extend_from_slice(&value.timestamp_millis().to_le_bytes());
    }

    /// Opens a nested document, written until its [`DocWriter::end`].
    pub fn document(&mut self, key: &str) {
        self.key(DOCUMENT, key);
        self.start();
    }

    /// Opens an array: its elements are written with the `_at` methods, `0`, `1`… in order.
    pub fn array(&mut self, key: &str) {
        self.key(ARRAY, key);
        self.start();
    }

    /// An array element's type and name: its index in decimal.
    fn index(&mut self, kind: u8, i: usize) {
        let mut digits = [0u8; 20];
        let (mut n, mut at) = (i, digits.len());
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.buf.push(kind);
        self.buf.extend_from_slice(&digits[at..]);
        self.buf.push(0);
    }

    /// Opens the `i`th element of an array as a document.
    pub fn document_at(&mut self, i: usize) {
        self.index(DOCUMENT, i);
        self.start();
    }

    /// An array of strings.
    pub fn strings<'a>(&mut self, key: &str, values: impl IntoIterator<Item = &'a str>) {
        self.array(key);
        for (i, value) in values.into_iter().enumerate() {
            self.index(STRING, i);
            self.string_value(value);
        }
        self.end();
    }

    /// Closes the innermost open document or array.
    pub fn end(&mut self) {
        self.buf.push(0);
        if let Some(at) = self.open.pop() {
            let length = (self.buf.len() - at) as i32;
            self.buf[at..at + 4].copy_from_slice(&length.to_le_bytes());
        }
    }

    /// The document, every nested one closed (the crate checks its length and last byte).
    pub fn finish(mut self) -> mongodb::bson::raw::Result<RawDocumentBuf> {
        while !self.open.is_empty() {
            self.end();
        }
        RawDocumentBuf::from_bytes(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use mongodb::bson::rawdoc;

    use super::*;

    /// Every kind of field, nested, is the bytes the `bson` crate writes.
    #[test]
    fn a_written_document_is_the_bson_crates() {
        let id = ObjectId::new();
        let at = DateTime::from_millis(1_700_000_000_123);
        let mut w = DocWriter::with_capacity(0);
        w.object_id("_id", id);
        w.str("s", "caf\u{e9}\0x");
        w.str("empty", "");
        w.i32("i", -7);
        w.i64("l", 1 << 40);
        w.f64("f", 2.5);
        w.bool("t", true);
        w.bool("no", false);
        w.date_time("at", at);
        w.document("d");
        w.document("inner");
        w.str("k", "v");
        w.end();
        w.strings("list", ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]);
        w.end();
        w.array("docs");
        w.document_at(0);
        w.str("x", "y");
        w.end();
        w.end();
        w.strings("none", []);
        let written = w.finish().unwrap();
        let expected = rawdoc! {
            "_id": id, "s": "caf\u{e9}\0x", "empty": "", "i": -7, "l": 1_i64 << 40, "f": 2.5, "t": true, "no": false,
            "at": at,
            "d": { "inner": { "k": "v" }, "list": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"] },
            "docs": [{ "x": "y" }],
            "none": [],
        };
        assert_eq!(written.as_bytes(), expected.as_bytes());
    }
}
