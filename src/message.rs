//! Builds the RFC 5322 message for a letter. Recipients travel only in the SMTP envelope: the
//! headers name no recipient, so a bulk letter never discloses one recipient to another.

use std::time::SystemTime;

use lettre::message::{
    Mailbox, SinglePart,
    header::{Header, HeaderName, HeaderValue},
};

use crate::model::Letter;

#[derive(Debug, thiserror::Error)]
#[error("cannot build the message: {0}")]
pub struct MessageError(String);

/// `To: undisclosed-recipients:;` — the empty group mail clients write for Bcc-only letters;
/// some filters score a letter without any To header as spam.
#[derive(Debug, Clone)]
struct UndisclosedRecipients;

impl Header for UndisclosedRecipients {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("To")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(UndisclosedRecipients)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "undisclosed-recipients:;".to_owned())
    }
}

/// The formatted message. Its Message-ID derives from the letter id, so a retry or a resend
/// after a crash carries the same id and receivers can recognise the duplicate.
pub fn build(letter: &Letter, from: &Mailbox, first_recipient: &str) -> Result<Vec<u8>, MessageError> {
    let domain = from.email.domain();
    let envelope = lettre::address::Envelope::new(
        Some(from.email.clone()),
        vec![first_recipient.parse().map_err(|e| MessageError(format!("recipient {first_recipient:?}: {e}")))?],
    )
    .map_err(|e| MessageError(e.to_string()))?;
    let message = lettre::Message::builder()
        .from(from.clone())
        .header(UndisclosedRecipients)
        .subject(letter.subject.as_str())
        .date(SystemTime::now())
        .message_id(Some(format!("<{}@{}>", letter.id.to_hex(), domain)))
        .envelope(envelope)
        .singlepart(SinglePart::html(letter.body.clone()))
        .map_err(|e| MessageError(e.to_string()))?;
    Ok(message.formatted())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Letter, Mailing};

    fn letter(subject: &str, body: &str) -> Letter {
        Letter::from_mailing(
            Mailing {
                subject: subject.into(),
                body: body.into(),
                addresses: vec!["alice@example.org".into(), "bob@example.net".into()],
                token: "t".into(),
            },
            "key",
            "t/0/0/0".into(),
            0,
        )
    }

    fn headers(raw: &str) -> &str {
        raw.split("\r\n\r\n").next().unwrap()
    }

    #[test]
    fn has_the_required_headers_and_no_recipient() {
        let letter = letter("Hello", "<p>Hi there</p>");
        let from: Mailbox = "Mailer <noreply@example.com>".parse().unwrap();
        let raw = String::from_utf8(build(&letter, &from, "alice@example.org").unwrap()).unwrap();
        let head = headers(&raw);
        for needle in [
            "From: Mailer <noreply@example.com>",
            "Subject: Hello",
            "Date: ",
            "MIME-Version: 1.0",
            "Content-Type: text/html; charset=utf-8",
            "To: undisclosed-recipients:;",
        ] {
            assert!(head.contains(needle), "missing {needle:?} in\n{head}");
        }
        assert!(head.contains(&format!("Message-ID: <{}@example.com>", letter.id.to_hex())), "{head}");
        for address in &letter.addresses {
            assert!(!head.to_lowercase().contains(&address.to_lowercase()), "{address} leaked into\n{head}");
        }
        assert!(!head.contains("Bcc"), "{head}");
    }

    #[test]
    fn non_ascii_subject_is_encoded_and_body_is_utf8() {
        let letter = letter("Привет, мир ✓", "<p>Grüße — 你好</p>");
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        let raw = build(&letter, &from, "alice@example.org").unwrap();
        let text = String::from_utf8(raw.clone()).unwrap();
        let head = headers(&text);
        assert!(head.contains("Subject: =?utf-8?"), "subject not RFC 2047 encoded:\n{head}");
        assert!(raw.is_ascii(), "the whole message should be 7-bit after transfer encoding");
    }

    #[test]
    fn subject_with_line_breaks_cannot_add_headers() {
        // Validation rejects these before sending; this is the second line of defence.
        let letter = letter("hi\r\nBcc: evil@example.org", "<p>x</p>");
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        let raw = String::from_utf8(build(&letter, &from, "alice@example.org").unwrap()).unwrap();
        assert!(!headers(&raw).lines().any(|line| line.starts_with("Bcc:")), "{raw}");
    }
}
