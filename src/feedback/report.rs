//! Reads the reports MTAs and mailbox providers mail back: RFC 3464 delivery status notifications
//! (`multipart/report; report-type=delivery-status`, and RFC 6533's `global-delivery-status`) and
//! RFC 5965 feedback reports (ARF, `report-type=feedback-report`).
//!
//! `mail-parser` takes the MIME structure apart. It hands the `message/delivery-status` and
//! `message/feedback-report` parts over as opaque bodies, so their fields (header-like groups:
//! one per message, then one per recipient, separated by blank lines) are read here.
//!
//! Only the standard shapes are read: every sample we have (Postfix's, see
//! tests/fixtures/feedback/README.md) is one. A report without a readable delivery-status or
//! feedback-report part is an error, and the listener keeps it as unparsed rather than guessing
//! from free text.

use mail_parser::{MessageParser, MimeHeaders as _, PartType};

/// What an RFC 3464 `Action` says happened to one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl Action {
    fn parse(raw: &str) -> Option<Action> {
        // RFC 3464 §2.3.3: the value may carry a comment, e.g. `failed (bad address)`.
        let word = raw.split(|c: char| c.is_whitespace() || c == '(').next().unwrap_or_default();
        match word.to_ascii_lowercase().as_str() {
            "failed" => Some(Action::Failed),
            "delayed" => Some(Action::Delayed),
            "delivered" => Some(Action::Delivered),
            "relayed" => Some(Action::Relayed),
            "expanded" => Some(Action::Expanded),
            _ => None,
        }
    }
}

/// One recipient's group of a DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientStatus {
    /// `Final-Recipient` (or `Original-Recipient` when that is missing), without its type.
    pub recipient: String,
    pub action: Action,
    /// The enhanced status code (`5.1.1`), when it is well formed.
    pub status: Option<String>,
    /// `Diagnostic-Code`, without its type, unfolded.
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
}

/// An ARF report's fields that matter to a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackReport {
    /// `Feedback-Type`, lower-case: `abuse`, `fraud`, `virus`, `not-spam`, `other`, …
    pub feedback_type: String,
    /// `Original-Rcpt-To` values, or the embedded message's single `To` address.
    pub recipients: Vec<String>,
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Delivery(Vec<RecipientStatus>),
    Feedback(FeedbackReport),
}

/// What the report says about the message it reports on (the returned message or its headers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Original {
    /// Its `Message-ID`, without the angle brackets.
    pub message_id: Option<String>,
    /// Its `Return-Path`, or the DSN's `X-Postfix-Sender` / ARF's `Original-Mail-From`.
    pub return_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub body: Body,
    pub original: Original,
}

/// Why a message is not a report we can use; the listener keeps such messages (unparsed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("not a message (no header)")]
    NotMime,
    #[error("no message/delivery-status or message/feedback-report part")]
    NotAReport,
    #[error("the {0} part is cut off (its MIME boundary never closes)")]
    Truncated(&'static str),
    #[error("the delivery-status part names no recipient with a known Action")]
    NoRecipient,
    #[error("the feedback report has no Feedback-Type")]
    NoFeedbackType,
    #[error("the feedback report names no recipient (no Original-Rcpt-To, and not one To address)")]
    NoComplainant,
}

/// Reads one received message.
pub fn parse(raw: &[u8]) -> Result<Report, ReportError> {
    let message = MessageParser::default().parse(raw).ok_or(ReportError::NotMime)?;
    let mut original = Original::default();
    let mut body = None;
    for part in &message.parts {
        let Some(content_type) = part.content_type() else { continue };
        let ctype = content_type.ctype().to_ascii_lowercase();
        let subtype = content_type.subtype().unwrap_or_default().to_ascii_lowercase();
        match (ctype.as_str(), subtype.as_str()) {
            ("message" | "text", "delivery-status" | "global-delivery-status") if body.is_none() => {
                if part.is_encoding_problem {
                    return Err(ReportError::Truncated("delivery-status"));
                }
                let groups = field_groups(part.contents());
                if let Some(sender) = groups.first().and_then(|g| field(g, "x-postfix-sender")) {
                    original.return_path = Some(strip_type(sender));
                }
                let recipients: Vec<RecipientStatus> = groups.iter().filter_map(|g| recipient_status(g)).collect();
                if recipients.is_empty() {
                    return Err(ReportError::NoRecipient);
                }
                body = Some(Body::Delivery(recipients));
            }
            ("message", "feedback-report") if body.is_none() => {
                if part.is_encoding_problem {
                    return Err(ReportError::Truncated("feedback-report"));
                }
                let fields: Vec<(String, String)> = field_groups(part.contents()).into_iter().flatten().collect();
                let feedback_type = field(&fields, "feedback-type")
                    .map(|t| t.to_ascii_lowercase())
                    .ok_or(ReportError::NoFeedbackType)?;
                let recipients = fields
                    .iter()
                    .filter(|(name, _)| name == "original-rcpt-to")
                    .map(|(_, value)| unbracket(&strip_type(value)))
                    .filter(|address| !address.is_empty())
                    .collect();
                if let Some(from) = field(&fields, "original-mail-from") {
                    original.return_path.get_or_insert_with(|| unbracket(from));
                }
                body = Some(Body::Feedback(FeedbackReport {
                    feedback_type,
                    recipients,
                    user_agent: field(&fields, "user-agent").map(str::to_owned),
                }));
            }
            ("message", "rfc822" | "global") | ("text", "rfc822-headers") => {
                read_original(part, &mut original);
            }
            _ => {}
        }
    }
    let mut body = body.ok_or(ReportError::NotAReport)?;
    if let Body::Feedback(report) = &mut body
        && report.recipients.is_empty()
    {
        // Some feedback loops leave Original-Rcpt-To out; a message sent to one recipient
        // (SMTP_DELIVERY=individual) still names them in its To header.
        let to = original_to(&message);
        if to.len() == 1 {
            report.recipients = to;
        } else {
            return Err(ReportError::NoComplainant);
        }
    }
    Ok(Report { body, original })
}

/// The returned message's Message-ID and Return-Path, from a message/rfc822 part (parsed by
/// mail-parser as a nested message) or a text/rfc822-headers part (headers only).
fn read_original(part: &mail_parser::MessagePart<'_>, original: &mut Original) {
    let headers = match &part.body {
        PartType::Message(nested) => nested.raw_message().to_vec(),
        _ => part.contents().to_vec(),
    };
    let Some(nested) = MessageParser::default().parse_headers(&headers[..]) else { return };
    if original.message_id.is_none() {
        original.message_id = nested.message_id().map(str::to_owned);
    }
    if let Some(path) = nested.header_raw("Return-Path") {
        original.return_path = Some(unbracket(path.trim()));
    }
}

/// The `To` addresses of the message a report embeds.
fn original_to(message: &mail_parser::Message<'_>) -> Vec<String> {
    message
        .parts
        .iter()
        .filter_map(|part| match &part.body {
            PartType::Message(nested) => nested.to(),
            _ => None,
        })
        .flat_map(|to| to.iter().filter_map(|a| a.address().map(str::to_owned)).collect::<Vec<_>>())
        // `To: <Undisclosed Recipients>` reads as an address without a domain.
        .filter(|address| address.contains('@'))
        .collect()
}

fn recipient_status(group: &[(String, String)]) -> Option<RecipientStatus> {
    let recipient = field(group, "final-recipient").or_else(|| field(group, "original-recipient"))?;
    let action = Action::parse(field(group, "action")?)?;
    let status = field(group, "status")
        .and_then(|s| s.split_whitespace().next())
        .filter(|s| is_enhanced_status(s))
        .map(str::to_owned);
    Some(RecipientStatus {
        recipient: unbracket(&strip_type(recipient)),
        action,
        status,
        diagnostic: field(group, "diagnostic-code").map(strip_type),
        remote_mta: field(group, "remote-mta").map(strip_type),
    })
}

/// `class.subject.detail` (RFC 3463): class 2, 4 or 5, then up to three and three digits.
pub fn is_enhanced_status(raw: &str) -> bool {
    let mut parts = raw.split('.');
    let class = parts.next().unwrap_or_default();
    let ok = |p: Option<&str>| p.is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    matches!(class, "2" | "4" | "5") && ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The header-like groups of a DSN or ARF body: fields unfolded, names lower-case, groups split
/// at blank lines. Lines that are not fields (a cut-off line, stray text) are skipped.
fn field_groups(body: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = String::from_utf8_lossy(body);
    let mut groups: Vec<Vec<(String, String)>> = Vec::new();
    let mut current: Vec<(String, String)> = Vec::new();
    for line in text.split('\n').map(|l| l.trim_end_matches('\r')) {
        if line.trim().is_empty() {
            if !current.is_empty() {
                groups.push(std::mem::take(&mut current));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = current.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':')
            && !name.is_empty()
            && !name.contains(char::is_whitespace)
        {
            current.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

fn field<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

/// `rfc822; a@b` → `a@b` (the address or diagnostic type of RFC 3464 §2.1.2).
fn strip_type(raw: &str) -> String {
    match raw.split_once(';') {
        Some((kind, value)) if !kind.contains(char::is_whitespace) && !kind.contains('@') => value.trim().to_owned(),
        _ => raw.trim().to_owned(),
    }
}

fn unbracket(raw: &str) -> String {
    raw.trim().trim_start_matches('<').trim_end_matches('>').trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/feedback/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    const RETURN_PATH: &str = "bounces+65a1b2c3d4e5f60718293a4b.0123456789abcdef0123@bounce.example.com";

    #[test]
    fn postfix_hard_bounce() {
        let report = parse(&fixture("dsn-postfix-hard.eml")).unwrap();
        let Body::Delivery(recipients) = report.body else { panic!("not a DSN") };
        assert_eq!(recipients.len(), 1);
        let r = &recipients[0];
        assert_eq!(r.recipient, "nobody@hard.example");
        assert_eq!(r.action, Action::Failed);
        assert_eq!(r.status.as_deref(), Some("5.1.1"));
        let diagnostic = r.diagnostic.as_deref().unwrap();
        assert!(diagnostic.starts_with("550 5.1.1 <nobody@hard.example>: Recipient address rejected"), "{diagnostic}");
        assert!(diagnostic.ends_with("User unknown in virtual mailbox table"), "unfolded: {diagnostic}");
        assert_eq!(report.original.return_path.as_deref(), Some(RETURN_PATH));
        assert_eq!(report.original.message_id.as_deref(), Some("65a1b2c3d4e5f60718293a4b@example.com"));
    }

    #[test]
    fn postfix_delay_and_expiry() {
        let delayed = parse(&fixture("dsn-postfix-delay.eml")).unwrap();
        let Body::Delivery(recipients) = delayed.body else { panic!("not a DSN") };
        assert_eq!(recipients.len(), 1);
        assert_eq!((recipients[0].recipient.as_str(), recipients[0].action), ("later@slow.example", Action::Delayed));
        assert_eq!(recipients[0].status.as_deref(), Some("4.2.2"));
        let expired = parse(&fixture("dsn-postfix-soft.eml")).unwrap();
        let Body::Delivery(recipients) = expired.body else { panic!("not a DSN") };
        assert_eq!((recipients[0].recipient.as_str(), recipients[0].action), ("later@slow.example", Action::Failed));
        assert_eq!(recipients[0].status.as_deref(), Some("4.2.2"));
    }

    #[test]
    fn arf_complaint() {
        let report = parse(&fixture("arf-rfc5965.eml")).unwrap();
        let Body::Feedback(feedback) = report.body else { panic!("not ARF") };
        assert_eq!(feedback.feedback_type, "abuse");
        assert_eq!(feedback.recipients, ["user@example.com"]);
        assert_eq!(feedback.user_agent.as_deref(), Some("SomeGenerator/1.0"));
        assert_eq!(report.original.return_path.as_deref(), Some("somespammer@example.net"));
        assert_eq!(report.original.message_id.as_deref(), Some("8787KJKJ3K4J3K4J3K4J3.mail@example.net"));
    }

    #[test]
    fn truncated_and_garbled_reports_are_errors() {
        let hard = fixture("dsn-postfix-hard.eml");
        let text = String::from_utf8(hard.clone()).unwrap();
        // Cut inside the notification text: the delivery-status part never arrives.
        let cut = text.find("The mail system").unwrap();
        assert_eq!(parse(&hard[..cut]), Err(ReportError::NotAReport));
        // Cut inside the delivery-status part: its boundary never closes.
        let cut = text.find("Action: failed").unwrap() + 10;
        assert_eq!(parse(&hard[..cut]), Err(ReportError::Truncated("delivery-status")));
        let cut = text.find("Final-Recipient").unwrap() + 5;
        assert_eq!(parse(&hard[..cut]), Err(ReportError::Truncated("delivery-status")));
        // Cut inside the returned message: the report itself is whole.
        let cut = text.find("Subject: Monthly news").unwrap();
        assert!(matches!(parse(&hard[..cut]).map(|r| r.body), Ok(Body::Delivery(_))));
        // Garbled: no Action the RFC knows.
        let garbled = text.replace("Action: failed", "Action: exploded");
        assert_eq!(parse(garbled.as_bytes()), Err(ReportError::NoRecipient));
        assert_eq!(parse(b""), Err(ReportError::NotMime));
        assert_eq!(parse(b"Subject: hello\r\n\r\nI am on holiday.\r\n"), Err(ReportError::NotAReport));
        assert!(parse(&[0xff; 64]).is_err());
        let arf = String::from_utf8(fixture("arf-rfc5965.eml")).unwrap();
        let cut = arf.find("Original-Rcpt-To").unwrap();
        assert_eq!(parse(&arf.as_bytes()[..cut]), Err(ReportError::Truncated("feedback-report")));
        let anonymous = arf.replace("Original-Rcpt-To: <user@example.com>\r\n", "");
        assert_eq!(parse(anonymous.as_bytes()), Err(ReportError::NoComplainant));
        let untyped = arf.replace("Feedback-Type: abuse\r\n", "");
        assert_eq!(parse(untyped.as_bytes()), Err(ReportError::NoFeedbackType));
    }

    #[test]
    fn enhanced_status_codes() {
        for good in ["5.1.1", "4.2.2", "2.0.0", "5.7.133"] {
            assert!(is_enhanced_status(good), "{good}");
        }
        for bad in ["", "5", "5.1", "3.1.1", "5.1.1.1", "5.a.1", "5.1234.1"] {
            assert!(!is_enhanced_status(bad), "{bad}");
        }
        assert_eq!(Action::parse("failed (bad address)"), Some(Action::Failed));
        assert_eq!(Action::parse("Delayed"), Some(Action::Delayed));
        assert_eq!(strip_type("rfc822; a@b.example"), "a@b.example");
        assert_eq!(strip_type("smtp; 550 5.1.1 no; really"), "550 5.1.1 no; really");
    }
}
