//! A BSON document's elements read straight from its bytes, for the claimed letters
//! (`letter_doc::read`). Written by hand, as `bson_writer` is, because the `bson` crate's raw
//! iterator took ~11,000 instructions a letter under callgrind (each element's key and value
//! checked through generic error-wrapping code, every key's bytes validated as UTF-8 apart from
//! the value's; issue 23). Keys come as bytes: a letter's are matched as bytes, and a caller that
//! keeps one checks it is UTF-8. Only the types a letter's document holds, and those a field this
//! version does not know may hold, are read; any other type or malformed bytes end the reading
//! with [`Malformed`], and the caller leaves the document to serde, which decides with its reason.

use mongodb::bson::{DateTime, oid::ObjectId};

/// The bytes do not make a document this reader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// One element's value; `Other` is a value of a type no letter field has, passed over.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Double(f64),
    Str(&'a str),
    Document(Elements<'a>),
    Array(Elements<'a>),
    ObjectId(ObjectId),
    DateTime(DateTime),
    Null,
    Int32(i32),
    Int64(i64),
    Other,
}

/// The elements of a document or an array, in order.
#[derive(Debug, Clone, Copy)]
pub struct Elements<'a> {
    /// What is left of the element list (the trailing NUL excluded).
    rest: &'a [u8],
}

impl<'a> Elements<'a> {
    /// The elements of the document `bytes` (its length prefix, its elements, its NUL).
    pub fn of(bytes: &'a [u8]) -> Result<Elements<'a>, Malformed> {
        let length = i32_at(bytes, 0)?;
        if length < 5 || length as usize != bytes.len() || bytes[bytes.len() - 1] != 0 {
            return Err(Malformed);
        }
        Ok(Elements { rest: &bytes[4..bytes.len() - 1] })
    }

    fn element(&mut self) -> Result<(&'a [u8], Value<'a>), Malformed> {
        let kind = self.rest[0];
        let key_end = memchr::memchr(0, &self.rest[1..]).ok_or(Malformed)? + 1;
        let key = &self.rest[1..key_end];
        let body = &self.rest[key_end + 1..];
        let (value, size) = match kind {
            0x01 => (Value::Double(f64::from_le_bytes(fixed(body)?)), 8),
            0x02 => {
                let (text, size) = string(body)?;
                (Value::Str(text), size)
            }
            0x03 | 0x04 => {
                let size = usize::try_from(i32_at(body, 0)?).map_err(|_| Malformed)?;
                let elements = Elements::of(body.get(..size).ok_or(Malformed)?)?;
                (if kind == 0x03 { Value::Document(elements) } else { Value::Array(elements) }, size)
            }
            // Binary: its length, its subtype, its bytes.
            0x05 => (Value::Other, 5 + usize::try_from(i32_at(body, 0)?).map_err(|_| Malformed)?),
            0x07 => (Value::ObjectId(ObjectId::from_bytes(fixed(body)?)), 12),
            // Boolean: no letter field is one.
            0x08 => match body.first() {
                Some(0 | 1) => (Value::Other, 1),
                _ => return Err(Malformed),
            },
            0x09 => (Value::DateTime(DateTime::from_millis(i64::from_le_bytes(fixed(body)?))), 8),
            0x0A => (Value::Null, 0),
            0x10 => (Value::Int32(i32::from_le_bytes(fixed(body)?)), 4),
            // Timestamp.
            0x11 => (Value::Other, 8),
            0x12 => (Value::Int64(i64::from_le_bytes(fixed(body)?)), 8),
            // Decimal128.
            0x13 => (Value::Other, 16),
            _ => return Err(Malformed),
        };
        if size > body.len() {
            return Err(Malformed);
        }
        self.rest = &body[size..];
        Ok((key, value))
    }
}

impl<'a> Iterator for Elements<'a> {
    type Item = Result<(&'a [u8], Value<'a>), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let element = self.element();
        if element.is_err() {
            // Nothing after a malformed element can be read.
            self.rest = &[];
        }
        Some(element)
    }
}

fn i32_at(bytes: &[u8], at: usize) -> Result<i32, Malformed> {
    Ok(i32::from_le_bytes(fixed(bytes.get(at..).ok_or(Malformed)?)?))
}

/// The first `N` bytes of `bytes`.
fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N], Malformed> {
    bytes.get(..N).and_then(|b| b.try_into().ok()).ok_or(Malformed)
}

/// A BSON string (its length with the NUL, its UTF-8 bytes, the NUL) and its size.
fn string(body: &[u8]) -> Result<(&str, usize), Malformed> {
    let length = usize::try_from(i32_at(body, 0)?).map_err(|_| Malformed)?;
    let bytes = body.get(4..4 + length).ok_or(Malformed)?;
    match bytes.split_last() {
        Some((0, text)) => Ok((std::str::from_utf8(text).map_err(|_| Malformed)?, 4 + length)),
        _ => Err(Malformed),
    }
}

#[cfg(test)]
mod tests {
    use mongodb::bson::{Binary, Bson, RawDocumentBuf, Timestamp, doc, spec::BinarySubtype};

    use super::*;

    /// A value as the `bson` crate reads it, in this reader's terms.
    fn theirs(value: &Bson) -> String {
        match value {
            Bson::Double(x) => format!("double {x}"),
            Bson::String(s) => format!("str {s}"),
            Bson::Document(d) => {
                format!("doc [{}]", d.iter().map(|(k, v)| format!("{k}={}", theirs(v))).collect::<Vec<_>>().join(", "))
            }
            Bson::Array(a) => format!(
                "array [{}]",
                a.iter().enumerate().map(|(i, v)| format!("{i}={}", theirs(v))).collect::<Vec<_>>().join(", ")
            ),
            Bson::ObjectId(id) => format!("oid {id}"),
            Bson::DateTime(at) => format!("date {}", at.timestamp_millis()),
            Bson::Null => "null".to_owned(),
            Bson::Int32(n) => format!("i32 {n}"),
            Bson::Int64(n) => format!("i64 {n}"),
            _ => "other".to_owned(),
        }
    }

    fn ours(value: Value<'_>) -> String {
        let list = |elements: Elements<'_>| {
            elements
                .map(|e| e.map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), ours(v))))
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .join(", ")
        };
        match value {
            Value::Double(x) => format!("double {x}"),
            Value::Str(s) => format!("str {s}"),
            Value::Document(d) => format!("doc [{}]", list(d)),
            Value::Array(a) => format!("array [{}]", list(a)),
            Value::ObjectId(id) => format!("oid {id}"),
            Value::DateTime(at) => format!("date {}", at.timestamp_millis()),
            Value::Null => "null".to_owned(),
            Value::Int32(n) => format!("i32 {n}"),
            Value::Int64(n) => format!("i64 {n}"),
            Value::Other => "other".to_owned(),
        }
    }

    /// Every type a letter's document holds, and the others a field this version does not know
    /// may hold, read as the `bson` crate reads them.
    #[test]
    fn elements_read_as_the_bson_crate_reads_them() {
        let document = doc! {
            "_id": ObjectId::new(), "d": 1.5, "s": "Grüße — 你好", "empty": "", "n": Bson::Null,
            "t": true, "f": false, "at": DateTime::from_millis(1_800_000_000_123), "i": -7_i32, "l": 1_i64 << 40,
            "nested": { "a": [1_i32, "x", { "b": Bson::Null }], "e": {} },
            "bin": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 2] },
            "ts": Timestamp { time: 1, increment: 2 }, "last": "end",
        };
        let raw = RawDocumentBuf::from_document(&document).unwrap();
        let read: Vec<String> = Elements::of(raw.as_bytes())
            .unwrap()
            .map(|e| e.map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), ours(v))))
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<String> = document.iter().map(|(k, v)| format!("{k}={}", theirs(v))).collect();
        assert_eq!(read, expected);
    }

    /// Bytes that are not a document end the reading with `Malformed`, never a panic: every
    /// truncation and every single corrupted byte of a document.
    #[test]
    fn malformed_bytes_are_refused_without_a_panic() {
        let document = doc! { "a": "text", "b": [1_i32, 2_i32], "c": { "d": 1.0 }, "e": ObjectId::new() };
        let bytes = RawDocumentBuf::from_document(&document).unwrap().into_bytes();
        let read_all = |bytes: &[u8]| {
            Elements::of(bytes).and_then(|e| e.map(|e| e.map(|(_, v)| ours_checked(v))).collect::<Result<Vec<_>, _>>())
        };
        assert!(read_all(&bytes).is_ok());
        for end in 0..bytes.len() {
            assert!(read_all(&bytes[..end]).is_err(), "truncated at {end}");
        }
        for at in 0..bytes.len() {
            for byte in [0x00, 0x05, 0x7f, 0xff] {
                let mut corrupted = bytes.clone();
                corrupted[at] = byte;
                let _ = read_all(&corrupted);
            }
        }
    }

    /// Reads nested values through, `Malformed` for any of them.
    fn ours_checked(value: Value<'_>) -> Result<(), Malformed> {
        match value {
            Value::Document(elements) | Value::Array(elements) => {
                for element in elements {
                    ours_checked(element?.1)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
