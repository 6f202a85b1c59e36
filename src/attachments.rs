//! A mailing's `Attachments` (issue 19): files carried with the letter, and inline images that the
//! HTML names by `cid:`.
//!
//! As with `SendAt` and `Metadata` (`crate::lanes`), the field is read as a loose JSON value and
//! checked per mailing, so a wrong type, bad base64 or a file over the limit fails only its own
//! letter (with a reason naming the attachment and the field) instead of sending the whole Kafka
//! message to the dead-letter topic. `POST /post` runs the same check and answers `400`.
//!
//! Stored with the letter as BSON binary, decoded: a third smaller than the base64 the producer
//! sent, and decoded once, at ingest, not at every attempt.

use crate::model::json_kind;
use std::collections::HashSet;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::config::AttachmentLimits;

/// Longest file name accepted, in characters: what file systems keep (255), so a name is never
/// cut on the recipient's disk.
pub const FILE_NAME_MAX_CHARS: usize = 255;
/// Longest `ContentId`, in characters; it travels in a header line of its own.
pub const CONTENT_ID_MAX_CHARS: usize = 250;

/// What an attachment without a `ContentType` is sent as.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// One attachment as stored with its letter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub file_name: String,
    /// A checked MIME type (`application/pdf`), parameters allowed.
    pub content_type: String,
    /// Set for an inline part, which the HTML shows as `<img src="cid:...">`; without `<>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_id: Option<String>,
    /// The decoded bytes; BSON binary in MongoDB. Defaults when a projection left it out.
    #[serde(with = "serde_bytes", default)]
    pub content: Vec<u8>,
}

impl Attachment {
    /// The form `smtp::message` encodes.
    pub fn part(&self) -> crate::smtp::message::AttachmentPart<'_> {
        crate::smtp::message::AttachmentPart {
            file_name: &self.file_name,
            content_type: &self.content_type,
            content_id: self.content_id.as_deref(),
            content: &self.content,
        }
    }

    /// The attachment as a producer sends it, for a dead letter's copy of its mailing.
    pub fn to_json(&self) -> Value {
        let mut object = serde_json::Map::new();
        object.insert("FileName".into(), Value::String(self.file_name.clone()));
        object.insert("ContentType".into(), Value::String(self.content_type.clone()));
        object.insert("Content".into(), Value::String(base64::engine::general_purpose::STANDARD.encode(&self.content)));
        if let Some(id) = &self.content_id {
            object.insert("ContentId".into(), Value::String(id.clone()));
        }
        Value::Object(object)
    }
}

/// Checks a mailing's `Attachments` against `limits` and decodes them. The error names the
/// attachment (by index), the field and the limit, as `400`s and failed letters quote it.
pub fn check(value: Option<&Value>, limits: &AttachmentLimits) -> Result<Vec<Attachment>, String> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(format!("Attachments must be an array of objects, not {}", json_kind(other))),
    };
    if items.len() > limits.max_count {
        return Err(format!(
            "Attachments has {} files, over the limit of {} (ATTACHMENTS_MAX_COUNT)",
            items.len(),
            limits.max_count
        ));
    }
    // The decoded size follows from the text's length, so a mailing far over the limit is refused
    // before anything is decoded.
    let estimated: usize = items
        .iter()
        .filter_map(|item| item.as_object()?.iter().find(|(k, _)| k.eq_ignore_ascii_case("Content"))?.1.as_str())
        .map(|text| text.len() / 4 * 3)
        .sum();
    if estimated > limits.max_bytes.saturating_add(3 * items.len()) {
        return Err(over_size(estimated, limits));
    }
    let mut attachments = Vec::with_capacity(items.len());
    let mut ids = HashSet::new();
    let mut total = 0usize;
    for (index, item) in items.iter().enumerate() {
        let attachment = one(index, item)?;
        if let Some(id) = &attachment.content_id
            && !ids.insert(id.clone())
        {
            return Err(format!("Attachments[{index}].ContentId {id:?} is used by an earlier attachment"));
        }
        total += attachment.content.len();
        attachments.push(attachment);
    }
    if total > limits.max_bytes {
        return Err(over_size(total, limits));
    }
    Ok(attachments)
}

fn over_size(bytes: usize, limits: &AttachmentLimits) -> String {
    format!(
        "Attachments hold {bytes} bytes (decoded), over the limit of {} bytes (ATTACHMENTS_MAX_BYTES)",
        limits.max_bytes
    )
}

fn one(index: usize, item: &Value) -> Result<Attachment, String> {
    let Value::Object(fields) = item else {
        return Err(format!("Attachments[{index}] must be an object, not {}", json_kind(item)));
    };
    let (mut file_name, mut content_type, mut content, mut content_id) = (None, None, None, None);
    // Keys in any case, as Go's JSON decoder matched the mailing's own fields.
    for (key, value) in fields {
        let slot = match key.to_ascii_lowercase().as_str() {
            "filename" => &mut file_name,
            "contenttype" => &mut content_type,
            "content" => &mut content,
            "contentid" => &mut content_id,
            _ => {
                return Err(format!(
                    "Attachments[{index}] has an unknown field {key:?} (expected FileName, ContentType, Content, ContentId)"
                ));
            }
        };
        *slot = match value {
            Value::Null => None,
            Value::String(text) => Some(text.as_str()),
            other => return Err(format!("Attachments[{index}].{key} must be a string, not {}", json_kind(other))),
        };
    }
    let at = |field: &str| format!("Attachments[{index}].{field}");

    let file_name = file_name.ok_or_else(|| format!("{} is required", at("FileName")))?;
    let chars = file_name.chars().count();
    if file_name.trim().is_empty() {
        return Err(format!("{} is empty", at("FileName")));
    }
    if chars > FILE_NAME_MAX_CHARS {
        return Err(format!("{} has {chars} characters, over the limit of {FILE_NAME_MAX_CHARS}", at("FileName")));
    }
    if file_name.chars().any(char::is_control) {
        return Err(format!("{} contains a control character (a line break, a tab or NUL)", at("FileName")));
    }

    let content_type = content_type.unwrap_or(DEFAULT_CONTENT_TYPE).trim();
    // It goes into a header as written: ASCII only, and what lettre (the `mime` crate) parses.
    if !content_type.is_ascii()
        || content_type.chars().any(|c| c.is_ascii_control())
        || lettre::message::header::ContentType::parse(content_type).is_err()
    {
        return Err(format!("{} is not a MIME type like application/pdf: {content_type:?}", at("ContentType")));
    }
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    // The part is base64-encoded, which RFC 2045 §6.4 forbids for multipart and message types.
    if essence.starts_with("multipart/") || essence.starts_with("message/") {
        return Err(format!(
            "{} {essence} cannot be an attachment's type (send the message as a file, e.g. application/octet-stream)",
            at("ContentType")
        ));
    }

    let text = content.ok_or_else(|| format!("{} is required (the file in base64)", at("Content")))?;
    // Base64 as tools write it, wrapped in lines (`base64` wraps at 76), is accepted too.
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let content = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("{} is not base64 (RFC 4648, with padding): {e}", at("Content")))?;

    let content_id = match content_id {
        None => None,
        Some(raw) => {
            // `<id>` as in the header is accepted; the HTML names it without, as `cid:id`.
            let id = raw.trim().strip_prefix('<').and_then(|s| s.strip_suffix('>')).unwrap_or(raw.trim());
            let valid = !id.is_empty()
                && id.len() <= CONTENT_ID_MAX_CHARS
                && id.bytes().all(|b| b.is_ascii_graphic() && !b"<>\"\\()[],;:".contains(&b));
            if !valid {
                return Err(format!(
                    "{} must be 1 to {CONTENT_ID_MAX_CHARS} printable ASCII characters without spaces, quotes, \
                     brackets or separators (like logo.png@example.com): {raw:?}",
                    at("ContentId")
                ));
            }
            Some(id.to_owned())
        }
    };

    Ok(Attachment { file_name: file_name.to_owned(), content_type: content_type.to_owned(), content_id, content })
}

/// The bytes the attachments hold in memory, for the letter's `size_bytes`.
pub fn bytes(attachments: &[Attachment]) -> usize {
    attachments.iter().map(|a| a.content.len() + a.file_name.len() + a.content_type.len()).sum()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LIMITS: AttachmentLimits = AttachmentLimits { max_count: 3, max_bytes: 100 };

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn absent_is_none_and_a_good_one_decodes() {
        assert_eq!(check(None, &LIMITS), Ok(Vec::new()));
        assert_eq!(check(Some(&Value::Null), &LIMITS), Ok(Vec::new()));
        let all: Vec<u8> = (0..=255u8).collect();
        let limits = AttachmentLimits { max_count: 3, max_bytes: 1000 };
        let value = json!([
            { "FileName": "Счёт №1.pdf", "ContentType": "application/pdf", "Content": b64(&all) },
            { "filename": "logo.png", "contentType": "image/png", "content": "aGk=", "ContentId": "<logo@x>" },
            { "FileName": "wrapped.bin", "Content": "aGVs\r\nbG8=\n" },
        ]);
        let attachments = check(Some(&value), &limits).unwrap();
        assert_eq!(attachments[0].content, all);
        assert_eq!(attachments[0].file_name, "Счёт №1.pdf");
        assert_eq!(attachments[1].content_id.as_deref(), Some("logo@x"));
        assert_eq!(attachments[1].content, b"hi");
        assert_eq!(
            (attachments[2].content_type.as_str(), &attachments[2].content[..]),
            (DEFAULT_CONTENT_TYPE, &b"hello"[..])
        );
    }

    #[test]
    fn limits_and_bad_values_name_the_field() {
        let file = |content: &str| json!({ "FileName": "a.txt", "ContentType": "text/plain", "Content": content });
        for (value, expected) in [
            (json!("x"), "Attachments must be an array of objects, not a string"),
            (
                json!([file("aGk="), file("aGk="), file("aGk="), file("aGk=")]),
                "Attachments has 4 files, over the limit of 3 (ATTACHMENTS_MAX_COUNT)",
            ),
            (
                json!([file(&b64(&[0; 101]))]),
                "Attachments hold 101 bytes (decoded), over the limit of 100 bytes (ATTACHMENTS_MAX_BYTES)",
            ),
            (json!([file(&b64(&[0; 60])), file(&b64(&[0; 41]))]), "Attachments hold 101 bytes"),
            (json!([file(&b64(&[0; 3000]))]), "Attachments hold 3000 bytes (decoded), over the limit"),
            (json!([file("not base64!")]), "Attachments[0].Content is not base64"),
            (json!([file("aGk")]), "Attachments[0].Content is not base64"),
            (json!([5]), "Attachments[0] must be an object, not a number"),
            (json!([{ "FileName": 5, "Content": "" }]), "Attachments[0].FileName must be a string, not a number"),
            (json!([{ "Content": "" }]), "Attachments[0].FileName is required"),
            (json!([{ "FileName": "a\r\nb", "Content": "" }]), "Attachments[0].FileName contains a control character"),
            (json!([{ "FileName": "a", "Content": "", "Data": "" }]), "Attachments[0] has an unknown field \"Data\""),
            (json!([{ "FileName": "a" }]), "Attachments[0].Content is required"),
            (
                json!([{ "FileName": "a", "Content": "", "ContentType": "pdf" }]),
                "Attachments[0].ContentType is not a MIME type",
            ),
            (
                json!([{ "FileName": "a", "Content": "", "ContentType": "multipart/mixed" }]),
                "Attachments[0].ContentType multipart/mixed cannot be",
            ),
            (json!([{ "FileName": "a", "Content": "", "ContentId": "a b" }]), "Attachments[0].ContentId must be"),
            (
                json!([{ "FileName": "a", "Content": "", "ContentId": "x" }, { "FileName": "b", "Content": "", "ContentId": "<x>" }]),
                "Attachments[1].ContentId \"x\" is used by an earlier attachment",
            ),
        ] {
            let error = check(Some(&value), &LIMITS).unwrap_err();
            assert!(error.starts_with(expected), "{value}: {error}");
        }
    }

    #[test]
    fn a_letter_carries_its_attachments_in_its_size_and_a_bad_one_fails_only_it() {
        use crate::model::{Letter, Status, parse_batch};
        let batch = json!([
            { "Subject": "s", "Body": "b", "Addresses": ["a@x.org"], "Token": "t",
              "Attachments": [{ "FileName": "a.bin", "Content": b64(&[1; 50]) }] },
            { "Subject": "s", "Body": "b", "Addresses": ["a@x.org"], "Token": "t", "Attachments": { "FileName": "a" } },
            { "Subject": "s", "Body": "b", "Addresses": ["a@x.org"], "Token": "t",
              "Attachments": [{ "FileName": "a.bin", "Content": b64(&[1; 101]) }] },
        ]);
        // A wrong type fails its letter, not the batch.
        let mailings = parse_batch(batch.to_string().as_bytes()).unwrap();
        let letters: Vec<Letter> =
            mailings.into_iter().map(|m| Letter::from_mailing_within(m, None, "s".into(), 0, &LIMITS)).collect();
        assert_eq!(letters[0].status, Status::Awaiting);
        assert_eq!(letters[0].attachments[0].content, vec![1; 50]);
        let text = "b".len() + "s".len() + "t".len() + "a@x.org".len();
        let file = 50 + "a.bin".len() + DEFAULT_CONTENT_TYPE.len();
        assert_eq!(letters[0].size_bytes as usize, text + file);
        assert_eq!(letters[0].clone_head().attachments, Vec::new());
        for (letter, reason) in [
            (&letters[1], "Attachments must be an array of objects, not an object"),
            (&letters[2], "Attachments hold 101 bytes (decoded), over the limit of 100 bytes"),
        ] {
            assert_eq!(letter.status, Status::Error);
            assert!(letter.error.as_deref().unwrap().starts_with(reason), "{letter:?}");
            assert!(letter.attachments.is_empty());
        }
    }

    #[test]
    fn stored_attachments_round_trip_through_bson_as_binary() {
        let attachment = Attachment {
            file_name: "a.bin".into(),
            content_type: "application/octet-stream".into(),
            content_id: None,
            content: (0..=255u8).collect(),
        };
        let document = mongodb::bson::to_document(&attachment).unwrap();
        assert!(matches!(document.get("content"), Some(mongodb::bson::Bson::Binary(_))), "{document}");
        assert_eq!(mongodb::bson::from_document::<Attachment>(document).unwrap(), attachment);
        let back = check(Some(&json!([attachment.to_json()])), &AttachmentLimits::default()).unwrap();
        assert_eq!(back, vec![attachment]);
    }
}
