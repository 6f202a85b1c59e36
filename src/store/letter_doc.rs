//! A letter's document, written and read field by field for the common letter, through serde for
//! the rest. Both are on the path of every letter (its insert, its claim), where serde's generic
//! encoding and decoding cost ~10,000 and ~17,000 instructions a letter under callgrind (issue
//! 23). `Letter`'s `Serialize` and `Deserialize` stay the definition: the tests hold the bytes
//! written to serde's, and a document read here to what serde reads from it.

use mongodb::bson::{Bson, RawDocument, RawDocumentBuf};

use super::{
    bson_reader::{Elements, Value},
    bson_writer::DocWriter,
};
use crate::{
    model::{Letter, Rejection, Status},
    priority::Lane,
};

/// A letter as the document `Letter`'s `Serialize` makes, written field by field: through serde,
/// the encoding took ~10,000 instructions a letter under callgrind, its `_id` written as a hex
/// string and parsed back (issue 23). Letters with feedback or attachments, a `created_at`
/// other than a date (ingest makes neither) or a metadata key no document can hold go through
/// serde. The test
/// `an_encoded_letter_is_the_serialized_one` holds the two to the same bytes.
pub(super) fn encode_letter(letter: &Letter) -> anyhow::Result<RawDocumentBuf> {
    let created_at = match &letter.created_at {
        None => None,
        Some(Bson::DateTime(at)) => Some(*at),
        Some(_) => return Ok(mongodb::bson::to_raw_document_buf(letter)?),
    };
    // A key with a NUL byte cannot be a BSON key: serde refuses it.
    if !letter.feedback.is_empty() || !letter.attachments.is_empty() || letter.metadata.keys().any(|k| k.contains('\0'))
    {
        return Ok(mongodb::bson::to_raw_document_buf(letter)?);
    }
    let mut d = DocWriter::with_capacity(letter.text_bytes() + 64 * letter.addresses.len() + 512);
    d.object_id("_id", letter.id);
    d.strings("addresses", letter.addresses.iter().map(String::as_str));
    d.str("subject", &letter.subject);
    d.str("body", &letter.body);
    d.str("token", &letter.token);
    d.str("status", letter.status.as_str());
    d.str("kafkakey", &letter.kafkakey);
    if let Some(key_null) = letter.key_null {
        d.i32("key_null", key_null);
    }
    if let Some(key_b64) = &letter.key_b64 {
        d.str("key_b64", key_b64);
    }
    if let Some(source) = &letter.source {
        d.str("source", source);
    }
    d.i32("attempts", letter.attempts);
    d.i64("due_ms", letter.due_ms);
    if letter.size_bytes != 0 {
        d.i64("size_bytes", letter.size_bytes);
    }
    if let Some(owner) = &letter.owner {
        d.str("owner", owner);
    }
    if let Some(lease_ms) = letter.lease_ms {
        d.i64("lease_ms", lease_ms);
    }
    if let Some(claim) = &letter.claim {
        d.str("claim", claim);
    }
    d.strings("delivered", letter.delivered.iter().map(String::as_str));
    rejections(&mut d, &letter.rejected, ("Address", "Reply"));
    if let Some(last_reply) = &letter.last_reply {
        d.str("last_reply", last_reply);
    }
    if let Some(error) = &letter.error {
        d.str("error", error);
    }
    if let Some(unreported) = letter.unreported {
        d.i32("unreported", unreported);
    }
    if let Some(created_at) = created_at {
        d.date_time("created_at", created_at);
    }
    d.i64("updated_ms", letter.updated_ms);
    if let Some(send_at_ms) = letter.send_at_ms {
        d.i64("send_at_ms", send_at_ms);
    }
    if let Some(not_after_ms) = letter.not_after_ms {
        d.i64("not_after_ms", not_after_ms);
    }
    if !letter.metadata.is_empty() {
        d.document("metadata");
        for (key, value) in &letter.metadata {
            d.str(key, value);
        }
        d.end();
    }
    d.str("lane", letter.lane.as_str());
    d.f64("vt", letter.vt);
    if let Some(tenant) = &letter.tenant {
        d.str("tenant", tenant);
    }
    if let Some(weight) = letter.weight {
        d.f64("weight", weight);
    }
    Ok(d.finish()?)
}

/// `rejected` as an array of documents named by `names`: an inserted letter has serde's
/// `Address` and `Reply` (the Go service's), an outcome has always written `address` and `reply`;
/// `Rejection` reads both.
pub(super) fn rejections(d: &mut DocWriter, rejected: &[Rejection], (address, reply): (&str, &str)) {
    d.array("rejected");
    for (i, rejection) in rejected.iter().enumerate() {
        d.document_at(i);
        d.str(address, &rejection.address);
        d.str(reply, &rejection.reply);
        d.end();
    }
    d.end();
}

/// A stored letter: read field by field when every field has the type this service writes, by
/// serde otherwise (documents of other writers, fields only serde reads, and anything serde
/// must refuse, with its reason).
pub(super) fn decode(document: &RawDocument) -> Result<Letter, mongodb::bson::de::Error> {
    match read(document) {
        Some(letter) => Ok(letter),
        None => mongodb::bson::from_slice(document.as_bytes()),
    }
}

/// The fields `Letter` cannot do without (no `#[serde(default)]`), as bits of `seen`.
const REQUIRED: u64 = (1 << 7) - 1;

/// The letter, or `None` for serde to decide: a field of another type, null, repeated or only
/// serde reads (`feedback`, `attachments`), or a required one missing.
fn read(document: &RawDocument) -> Option<Letter> {
    let mut letter = Letter::blank();
    let mut seen = 0_u64;
    for element in Elements::of(document.as_bytes()).ok()? {
        let (key, value) = element.ok()?;
        let bit = match key {
            b"_id" => {
                letter.id = match value {
                    Value::ObjectId(id) => id,
                    _ => return None,
                };
                0
            }
            b"addresses" => {
                letter.addresses = strings(value)?;
                1
            }
            b"subject" => {
                letter.subject = text(value)?;
                2
            }
            b"body" => {
                letter.body = text(value)?;
                3
            }
            b"token" => {
                letter.token = text(value)?;
                4
            }
            b"status" => {
                letter.status = status(string_of(value)?)?;
                5
            }
            b"kafkakey" => {
                letter.kafkakey = text(value)?;
                6
            }
            b"key_null" => {
                letter.key_null = Some(int32(value)?);
                7
            }
            b"key_b64" => {
                letter.key_b64 = Some(text(value)?);
                8
            }
            b"source" => {
                letter.source = Some(text(value)?);
                9
            }
            b"attempts" => {
                letter.attempts = int32(value)?;
                10
            }
            b"due_ms" => {
                letter.due_ms = int64(value)?;
                11
            }
            b"size_bytes" => {
                letter.size_bytes = int64(value)?;
                12
            }
            b"owner" => {
                letter.owner = Some(text(value)?);
                13
            }
            b"lease_ms" => {
                letter.lease_ms = Some(int64(value)?);
                14
            }
            b"claim" => {
                letter.claim = Some(text(value)?);
                15
            }
            b"delivered" => {
                letter.delivered = strings(value)?;
                16
            }
            b"rejected" => {
                letter.rejected = array(value)?.map(|r| rejection(r.ok()?.1)).collect::<Option<_>>()?;
                17
            }
            b"last_reply" => {
                letter.last_reply = Some(text(value)?);
                18
            }
            b"error" => {
                letter.error = Some(text(value)?);
                19
            }
            b"unreported" => {
                letter.unreported = Some(int32(value)?);
                20
            }
            b"created_at" => {
                letter.created_at = match value {
                    Value::DateTime(at) => Some(Bson::DateTime(at)),
                    _ => return None,
                };
                21
            }
            b"updated_ms" => {
                letter.updated_ms = int64(value)?;
                22
            }
            b"send_at_ms" => {
                letter.send_at_ms = Some(int64(value)?);
                23
            }
            b"not_after_ms" => {
                letter.not_after_ms = Some(int64(value)?);
                24
            }
            b"metadata" => {
                for entry in document_of(value)? {
                    let (key, value) = entry.ok()?;
                    letter.metadata.insert(std::str::from_utf8(key).ok()?.to_owned(), text(value)?);
                }
                25
            }
            b"lane" => {
                letter.lane = match string_of(value)? {
                    "transactional" => Lane::Transactional,
                    "bulk" => Lane::Bulk,
                    _ => return None,
                };
                26
            }
            b"vt" => {
                letter.vt = float(value)?;
                27
            }
            b"tenant" => {
                letter.tenant = Some(text(value)?);
                28
            }
            b"weight" => {
                letter.weight = Some(float(value)?);
                29
            }
            b"feedback" | b"attachments" => return None,
            // Fields this version does not know are passed over, as serde passes them over
            // (a key that is not UTF-8 is serde's to refuse).
            _ => match std::str::from_utf8(key) {
                Ok(_) => continue,
                Err(_) => return None,
            },
        };
        if seen & (1 << bit) != 0 {
            return None;
        }
        seen |= 1 << bit;
    }
    (seen & REQUIRED == REQUIRED).then_some(letter)
}

/// Integers and floats as serde takes them: of either integer width where the value fits (a
/// MongoDB-wire server may store a small 64-bit integer as 32 bits), floats from integers too.
fn int64(value: Value<'_>) -> Option<i64> {
    match value {
        Value::Int64(n) => Some(n),
        Value::Int32(n) => Some(i64::from(n)),
        _ => None,
    }
}

fn int32(value: Value<'_>) -> Option<i32> {
    match value {
        Value::Int32(n) => Some(n),
        Value::Int64(n) => i32::try_from(n).ok(),
        _ => None,
    }
}

fn float(value: Value<'_>) -> Option<f64> {
    match value {
        Value::Double(x) => Some(x),
        Value::Int32(n) => Some(f64::from(n)),
        Value::Int64(n) => Some(n as f64),
        _ => None,
    }
}

fn string_of(value: Value<'_>) -> Option<&str> {
    match value {
        Value::Str(text) => Some(text),
        _ => None,
    }
}

fn text(value: Value<'_>) -> Option<String> {
    string_of(value).map(str::to_owned)
}

fn array(value: Value<'_>) -> Option<Elements<'_>> {
    match value {
        Value::Array(elements) => Some(elements),
        _ => None,
    }
}

fn document_of(value: Value<'_>) -> Option<Elements<'_>> {
    match value {
        Value::Document(elements) => Some(elements),
        _ => None,
    }
}

fn strings(value: Value<'_>) -> Option<Vec<String>> {
    array(value)?.map(|v| text(v.ok()?.1)).collect()
}

fn status(value: &str) -> Option<Status> {
    Some(match value {
        "awaiting" => Status::Awaiting,
        "processing" => Status::Processing,
        "sent" => Status::Sent,
        "error" => Status::Error,
        _ => return None,
    })
}

/// A rejection under the Go service's names or the lower-case ones outcomes write (`Rejection`'s
/// aliases); both at once is serde's to refuse.
fn rejection(value: Value<'_>) -> Option<Rejection> {
    let (mut address, mut reply) = (None, None);
    for entry in document_of(value)? {
        let (key, value) = entry.ok()?;
        let slot = match key {
            b"Address" | b"address" => &mut address,
            b"Reply" | b"reply" => &mut reply,
            _ => continue,
        };
        if slot.replace(string_of(value)?).is_some() {
            return None;
        }
    }
    Some(Rejection { address: address?.to_owned(), reply: reply?.to_owned() })
}

#[cfg(test)]
mod tests {
    use mongodb::bson::{doc, oid::ObjectId};

    use super::*;

    /// A letter with every optional field absent, the rest as `Letter::with_every_field`.
    fn bare() -> Letter {
        let mut bare = Letter::with_every_field();
        (bare.key_null, bare.key_b64, bare.source, bare.size_bytes) = (None, None, None, 0);
        (bare.owner, bare.lease_ms, bare.claim, bare.last_reply, bare.error) = (None, None, None, None, None);
        (bare.unreported, bare.created_at, bare.send_at_ms, bare.not_after_ms) = (None, None, None, None);
        (bare.tenant, bare.weight, bare.lane) = (None, None, Lane::Bulk);
        (bare.addresses, bare.delivered, bare.rejected, bare.metadata) = (vec![], vec![], vec![], Default::default());
        bare
    }

    /// The hand-written encoding is serde's, byte for byte, for a letter with every field set
    /// and for one with every optional field absent. `Letter::with_every_field` is a struct
    /// literal, so a field added to `Letter` fails to compile there until it is set, and then
    /// fails here until the encoder writes it.
    #[test]
    fn an_encoded_letter_is_the_serialized_one() {
        let mut nul_key = bare();
        nul_key.metadata.insert("a\0b".into(), "v".into());
        for letter in [&Letter::with_every_field(), &bare()] {
            let ours = encode_letter(letter).unwrap();
            let serde = mongodb::bson::to_raw_document_buf(letter).unwrap();
            assert_eq!(ours.as_bytes(), serde.as_bytes(), "{:?}", ours.to_document());
        }
        assert!(encode_letter(&nul_key).is_err(), "refused as serde refuses it, not a panic");
    }

    /// What the reader makes of a document is what serde makes of it: for the letters this
    /// service writes (read here) and for documents it leaves to serde, which then decides.
    #[test]
    fn a_read_letter_is_the_deserialized_one() {
        let mut outcome = Letter::with_every_field();
        outcome.rejected.push(Rejection { address: "c@x.org".into(), reply: "452 later".into() });
        let mut as_outcome = mongodb::bson::to_document(&outcome).unwrap();
        // Outcomes write rejections in lower case.
        as_outcome.insert("rejected", vec![doc! { "address": "b@x.org", "reply": "550 no", "extra": 1 }]);
        let mut narrow = mongodb::bson::to_document(&Letter::with_every_field()).unwrap();
        narrow.insert("size_bytes", 1234_i32);
        narrow.insert("attempts", 3_i64);
        narrow.insert("vt", 12_i32);
        narrow.insert("weight", 2_i64);
        let id = ObjectId::new();
        let go = doc! { "_id": id, "addresses": ["a@x.org"], "subject": "s", "body": "b", "token": "t",
        "status": "awaiting", "kafkakey": "k", "unknown_field": { "x": 1 } };
        let read_here = [
            mongodb::bson::to_document(&Letter::with_every_field()).unwrap(),
            mongodb::bson::to_document(&bare()).unwrap(),
            as_outcome,
            narrow,
            go.clone(),
        ];
        for document in &read_here {
            let raw = RawDocumentBuf::from_document(document).unwrap();
            let ours = read(&raw).unwrap_or_else(|| panic!("not read here: {document}"));
            assert_eq!(ours, mongodb::bson::from_slice::<Letter>(raw.as_bytes()).unwrap(), "{document}");
        }
        // Left to serde, which reads some and refuses others; `decode` answers as serde does.
        let with = |key: &str, value: Bson| {
            let mut d = go.clone();
            d.insert(key, value);
            d
        };
        let mut serdes = vec![
            with("attempts", Bson::Int64(1 << 40)),
            with("vt", Bson::String("1".into())),
            with("error", Bson::Null),
            with("created_at", Bson::String("2020".into())),
            with("feedback", Bson::Document(doc! {})),
            with("status", Bson::String("bounced".into())),
            with("subject", Bson::Int32(1)),
            with("rejected", Bson::Array(vec![Bson::Document(doc! { "Address": "a", "address": "b", "Reply": "r" })])),
        ];
        let mut missing = go.clone();
        missing.remove("body");
        serdes.push(missing);
        for document in &serdes {
            let raw = RawDocumentBuf::from_document(document).unwrap();
            assert!(read(&raw).is_none(), "read here: {document}");
            let serde = mongodb::bson::from_slice::<Letter>(raw.as_bytes()).map_err(|e| e.to_string());
            assert_eq!(decode(&raw).map_err(|e| e.to_string()), serde, "{document}");
        }
    }
}
