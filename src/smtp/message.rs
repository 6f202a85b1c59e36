//! Builds the RFC 5322 message. In BCC mode recipients travel only in the SMTP envelope: the
//! headers name no recipient, so a bulk letter never discloses one recipient to another. A
//! per-recipient copy (`SMTP_DELIVERY=individual`) names its one recipient in `To:`.

use std::{
    collections::VecDeque,
    fmt,
    sync::{Arc, LazyLock, Mutex, PoisonError},
    time::SystemTime,
};

use lettre::message::{
    Body, Mailbox, Mailboxes, MultiPart, SinglePart,
    header::{
        self, ContentDisposition, ContentId, ContentTransferEncoding, ContentType, Header, HeaderName, HeaderValue,
        Headers, MIME_VERSION_1_0,
    },
};

/// The longest Subject accepted, in characters. A header line may hold 998 octets (RFC 5322
/// §2.1.1); lettre folds a Subject at its spaces and encodes non-ASCII words in short encoded
/// words, but cannot break one long ASCII word. 900 keeps any word within a line after
/// `Subject: `.
pub const SUBJECT_MAX_CHARS: usize = 900;

/// The longest line SMTP allows, without its CRLF (RFC 5321 §4.5.3.1.6).
pub const MAX_LINE_OCTETS: usize = 998;

#[derive(Debug, thiserror::Error)]
#[error("cannot build the message: {0}")]
pub struct MessageError(String);

impl MessageError {
    pub fn new(reason: String) -> MessageError {
        MessageError(reason)
    }
}

/// What a message is made of.
#[derive(Debug, Clone, Copy)]
pub struct Content<'a> {
    /// The left part of the Message-ID; the From domain is the right part.
    pub id: &'a str,
    pub subject: &'a str,
    pub html: &'a str,
}

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

/// Why a Subject cannot be sent, if it cannot.
pub fn check_subject(subject: &str) -> Result<(), String> {
    if subject.contains(['\r', '\n', '\0']) {
        return Err("Subject contains a line break or NUL, which could inject headers".to_owned());
    }
    let chars = subject.chars().count();
    if chars > SUBJECT_MAX_CHARS {
        return Err(format!("Subject has {chars} characters; at most {SUBJECT_MAX_CHARS} fit in a mail header"));
    }
    Ok(())
}

/// Bare CR and bare LF become CRLF, the only line end SMTP knows; the body the recipient decodes
/// is then the posted one with its line ends normalised.
pub fn normalize_line_ends(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + text.len() / 32);
    let mut start = 0;
    // CR and LF are ASCII, never inside a UTF-8 sequence: the runs between them are copied whole.
    while let Some(at) = memchr::memchr2(b'\r', b'\n', &bytes[start..]) {
        let at = start + at;
        out.push_str(&text[start..at]);
        out.push_str("\r\n");
        start = if bytes[at] == b'\r' && bytes.get(at + 1) == Some(&b'\n') { at + 2 } else { at + 1 };
    }
    out.push_str(&text[start..]);
    out
}

/// The text width of the plain-text alternative, as mail clients wrap it.
const TEXT_WIDTH: usize = 78;

/// HTML beyond this is left out of the text alternative. Rendering costs far more than
/// formatting (a 600 KB body took seconds and tens of MB), and Gmail clips messages at 102 KB
/// anyway; the HTML part stays whole.
pub const TEXT_FROM_HTML_MAX_BYTES: usize = 64 * 1024;

/// The texts of the bodies rendered last, most recent first. A campaign sends one body in many
/// letters, and rendering it (html2text parses the whole document into a tree) cost more CPU than
/// everything else the service does per letter. Entries are compared by their whole HTML, so a
/// hit is exact; bodies over [`TEXT_FROM_HTML_MAX_BYTES`] are not kept, which bounds the memory
/// to about 1 MiB. Written by hand: an eight-entry most-recently-used list is shorter than a
/// cache crate's set-up.
static RECENT_TEXTS: Mutex<VecDeque<(String, String)>> = Mutex::new(VecDeque::new());
const RECENT_TEXTS_KEPT: usize = 8;

/// The `text/plain` alternative of an HTML body: its text with links kept as numbered references.
/// Spam filters score HTML-only mail, and text-only clients show this part.
pub fn text_of_html(html: &str) -> Result<String, MessageError> {
    if html.len() > TEXT_FROM_HTML_MAX_BYTES {
        return render_text(html);
    }
    // The list is consistent after any panic (entries are whole), so a poisoned lock is used as is.
    {
        let mut recent = RECENT_TEXTS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = recent.iter().position(|(body, _)| body == html)
            && let Some(entry) = recent.remove(at)
        {
            let text = entry.1.clone();
            recent.push_front(entry);
            return Ok(text);
        }
    }
    let text = render_text(html)?;
    let mut recent = RECENT_TEXTS.lock().unwrap_or_else(PoisonError::into_inner);
    recent.push_front((html.to_owned(), text.clone()));
    recent.truncate(RECENT_TEXTS_KEPT);
    Ok(text)
}

fn render_text(html: &str) -> Result<String, MessageError> {
    let mut end = html.len().min(TEXT_FROM_HTML_MAX_BYTES);
    while !html.is_char_boundary(end) {
        end -= 1;
    }
    let mut text = html2text::from_read(&html.as_bytes()[..end], TEXT_WIDTH)
        .map_err(|e| MessageError(format!("HTML to text: {e}")))?;
    if end < html.len() {
        text.push_str("\n[The rest of this message is in its HTML version.]\n");
    }
    Ok(text)
}

/// Headers added to the message beyond the fixed ones (List-Unsubscribe and its kin), already
/// validated by whoever made them.
pub type ExtraHeaders = Vec<(HeaderName, String)>;

/// The formatted message. Its Message-ID derives from the letter id, so every chunk, every retry
/// and a resend after a crash carry the same id and receivers can recognise the duplicate.
pub fn build(content: Content<'_>, from: &Mailbox) -> Result<Vec<u8>, MessageError> {
    let text = text_of_html(content.html)?;
    Ok(compose(content, &text, from, None, Vec::new())?.finish()?.to_bytes().into_owned())
}

/// A message ready for the relay: its bytes are [`Composed::parts`] one after the other. A BCC
/// letter's or a copy's headers are its own and its body is the one every letter with that body
/// shares, so the body is copied once per transaction, straight into the connection's buffer
/// with its dots doubled, and not first into a message of its own (issue 23). A signed message
/// is whole: the signer formats it.
#[derive(Debug, Default)]
pub struct Composed(Parts);

#[derive(Debug)]
enum Parts {
    Whole(Vec<u8>),
    Over { head: Vec<u8>, body: Arc<EncodedBody> },
}

impl Default for Parts {
    fn default() -> Parts {
        Parts::Whole(Vec::new())
    }
}

impl Composed {
    /// A message formatted already, in one piece.
    pub fn whole(bytes: Vec<u8>) -> Composed {
        Composed(Parts::Whole(bytes))
    }

    /// The message's bytes in order; their concatenation is the message.
    pub fn parts(&self) -> [&[u8]; 2] {
        match &self.0 {
            Parts::Whole(bytes) => [bytes, &[]],
            Parts::Over { head, body } => [head, &body.bytes],
        }
    }

    /// The message's length in octets, as `SIZE=` declares it.
    pub fn len(&self) -> usize {
        self.parts().iter().map(|part| part.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every octet is ASCII (else the message needs `BODY=8BITMIME`).
    pub fn is_ascii(&self) -> bool {
        match &self.0 {
            Parts::Whole(bytes) => bytes.is_ascii(),
            Parts::Over { head, body } => body.ascii && head.is_ascii(),
        }
    }

    /// The message in one buffer (copied unless it is whole already): for what reads the
    /// message as a whole, never the send path.
    pub fn to_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.0 {
            Parts::Whole(bytes) => std::borrow::Cow::Borrowed(bytes),
            Parts::Over { .. } => std::borrow::Cow::Owned(self.parts().concat()),
        }
    }
}

/// The `multipart/alternative` body of an HTML body and its text alternative, encoded (7bit,
/// quoted-printable or base64 per part, as lettre chooses) and checked: everything of a message
/// that depends on the body alone, so letters that carry the same body share it.
#[derive(Debug)]
pub struct EncodedBody {
    /// The message's Content-Type: `multipart/alternative`, or with attachments `multipart/mixed`
    /// or `multipart/related`, naming the boundary.
    content_type: String,
    /// `Content-Type` with its value as lettre encodes and folds it, a header line of every
    /// message with this body.
    content_type_line: String,
    /// The multipart's bytes after its header block: the message's body.
    bytes: Vec<u8>,
    /// The longest line of `bytes`, without its line end.
    longest_line: usize,
    /// Whether `bytes` is ASCII, which a message's `BODY=8BITMIME` depends on: known once per
    /// body, not found again by every transaction that carries it.
    ascii: bool,
}

impl EncodedBody {
    fn new(content_type: String, bytes: Vec<u8>) -> Result<EncodedBody, MessageError> {
        let parsed = ContentType::parse(&content_type).map_err(|e| MessageError(format!("Content-Type: {e}")))?;
        let content_type_line = line_of(parsed.display());
        Ok(EncodedBody {
            content_type,
            content_type_line,
            longest_line: longest_line(&bytes),
            ascii: bytes.is_ascii(),
            bytes,
        })
    }

    fn encode(html: &str, text: &str) -> Result<EncodedBody, MessageError> {
        let alternative = MultiPart::alternative_plain_html(normalize_line_ends(text), normalize_line_ends(html));
        let boundary = alternative.boundary();
        let mut formatted = alternative.formatted();
        let body_start = memchr::memmem::find(&formatted, b"\r\n\r\n")
            .ok_or_else(|| MessageError("the multipart has no header end".to_owned()))?;
        // In place: a megabyte body is not copied once more.
        formatted.drain(..body_start + 4);
        // lettre encoded each part, so the whole is 7-bit; a message that is not would need
        // 8BITMIME, which a relay may not offer.
        if !formatted.is_ascii() || formatted.contains(&0) {
            return Err(MessageError("the multipart is not 7-bit".to_owned()));
        }
        EncodedBody::new(format!("multipart/alternative; boundary=\"{boundary}\""), formatted)
    }

    /// This body (an HTML body and its text alternative) with attachments around it:
    /// `multipart/mixed` of the alternative and the files; inline parts (those with a Content-ID,
    /// which the HTML shows as `cid:`) go with the alternative in a `multipart/related` (RFC
    /// 2387), inside the `mixed` when there are files too. Each part base64 in lines of 76.
    /// Made once per letter: the alternative is the shared one, copied once into the new body.
    pub fn with_attachments(&self, attachments: &[AttachmentPart<'_>]) -> Result<EncodedBody, MessageError> {
        let alternative_type = ContentType::parse(&self.content_type)
            .map_err(|e| MessageError(format!("Content-Type of the alternative: {e}")))?;
        let alternative = SinglePart::builder()
            .header(alternative_type)
            .body(Body::dangerous_pre_encoded(self.bytes.clone(), ContentTransferEncoding::SevenBit));
        let (inline, files): (Vec<&AttachmentPart<'_>>, Vec<&AttachmentPart<'_>>) =
            attachments.iter().partition(|part| part.content_id.is_some());
        let related = match inline.is_empty() {
            true => None,
            false => {
                // A fresh random boundary (lettre's), with RFC 2387's `type` of the root part.
                let boundary = MultiPart::related().build().boundary();
                let kind = format!("multipart/related; boundary=\"{boundary}\"; type=\"multipart/alternative\"");
                let kind = ContentType::parse(&kind).map_err(|e| MessageError(format!("Content-Type: {e}")))?;
                let mut related = MultiPart::builder().header(kind).singlepart(alternative.clone());
                for part in &inline {
                    related = related.singlepart(attachment_part(part)?);
                }
                Some(related)
            }
        };
        let top = match (related, files.is_empty()) {
            (Some(related), true) => related,
            (related, _) => {
                let mixed = MultiPart::mixed();
                let mut mixed = match related {
                    Some(related) => mixed.multipart(related),
                    None => mixed.singlepart(alternative),
                };
                for part in &files {
                    mixed = mixed.singlepart(attachment_part(part)?);
                }
                mixed
            }
        };
        let content_type = top
            .headers()
            .get_raw("Content-Type")
            .ok_or_else(|| MessageError("the multipart has no Content-Type".to_owned()))?
            .to_owned();
        let mut formatted = top.formatted();
        let body_start = memchr::memmem::find(&formatted, b"\r\n\r\n")
            .ok_or_else(|| MessageError("the multipart has no header end".to_owned()))?;
        formatted.drain(..body_start + 4);
        if !formatted.is_ascii() || formatted.contains(&0) {
            return Err(MessageError("the multipart is not 7-bit".to_owned()));
        }
        EncodedBody::new(content_type, formatted)
    }
}

/// An attachment as the message carries it; `crate::attachments` checked the values (a MIME
/// type, a file name without control characters, a Content-ID of printable ASCII).
#[derive(Debug, Clone, Copy)]
pub struct AttachmentPart<'a> {
    pub file_name: &'a str,
    pub content_type: &'a str,
    /// Set for an inline part: the id without `<>`.
    pub content_id: Option<&'a str>,
    pub content: &'a [u8],
}

/// One attachment's MIME part: the file name in `Content-Disposition` (RFC 2231 when not ASCII,
/// as lettre writes it) and, for the clients that read only that, in `Content-Type`'s `name`
/// (RFC 2047 words when not ASCII, as Gmail and Thunderbird write it); the content base64.
fn attachment_part(part: &AttachmentPart<'_>) -> Result<SinglePart, MessageError> {
    let mut builder = SinglePart::builder().header(NamedContentType::new(part.content_type, part.file_name)?);
    builder = match part.content_id {
        Some(id) => builder
            .header(ContentId::from(format!("<{id}>")))
            .header(ContentDisposition::inline_with_name(part.file_name)),
        None => builder.header(ContentDisposition::attachment(part.file_name)),
    };
    let body = Body::new_with_encoding(part.content.to_vec(), ContentTransferEncoding::Base64)
        .map_err(|_| MessageError(format!("cannot base64-encode {:?}", part.file_name)))?;
    Ok(builder.body(body))
}

/// `Content-Type: <type>; name="<file name>"`, encoded as lettre's own headers are.
#[derive(Debug, Clone)]
struct NamedContentType(HeaderValue);

impl NamedContentType {
    fn new(content_type: &str, file_name: &str) -> Result<NamedContentType, MessageError> {
        use email_encoding::headers::{rfc2047, rfc2231, writer::EmailWriter};
        use std::fmt::Write as _;
        let failed = |_| MessageError(format!("cannot encode the name {file_name:?}"));
        let mut encoded = String::new();
        {
            let mut w = EmailWriter::new(&mut encoded, "Content-Type: ".len(), 0, false);
            w.write_str(content_type).map_err(failed)?;
            w.write_char(';').map_err(failed)?;
            w.space();
            if file_name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
                rfc2231::encode("name", file_name, &mut w).map_err(failed)?;
            } else {
                w.write_str("name=\"").map_err(failed)?;
                rfc2047::encode(file_name, &mut w).map_err(failed)?;
                w.write_char('"').map_err(failed)?;
            }
        }
        let raw = format!("{content_type}; name=\"{file_name}\"");
        Ok(NamedContentType(HeaderValue::dangerous_new_pre_encoded(Self::name(), raw, encoded)))
    }
}

impl Header for NamedContentType {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Content-Type")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Err("only written, never parsed".into())
    }

    fn display(&self) -> HeaderValue {
        self.0.clone()
    }
}

/// The encoded bodies made last, most recent first, as [`RECENT_TEXTS`] keeps texts: a campaign
/// sends one body in many letters, and encoding it (line ends, quoted-printable, lettre's
/// multipart) cost a third of the service's instructions per letter. A hit is exact (the whole
/// HTML and text compared); the parts of one body then share their MIME boundary, which needs
/// only to be absent from the parts. Bodies over [`TEXT_FROM_HTML_MAX_BYTES`] are not kept.
type RecentBody = (String, String, Arc<EncodedBody>);
static RECENT_BODIES: Mutex<VecDeque<RecentBody>> = Mutex::new(VecDeque::new());

/// The encoded body of `html` with its text alternative `text`, from [`RECENT_BODIES`] when there.
pub fn encoded_body(html: &str, text: &str) -> Result<Arc<EncodedBody>, MessageError> {
    if html.len() > TEXT_FROM_HTML_MAX_BYTES {
        return Ok(Arc::new(EncodedBody::encode(html, text)?));
    }
    // The list is consistent after any panic (entries are whole), so a poisoned lock is used as is.
    {
        let mut recent = RECENT_BODIES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = recent.iter().position(|(h, t, _)| h == html && t == text)
            && let Some(entry) = recent.remove(at)
        {
            let body = Arc::clone(&entry.2);
            recent.push_front(entry);
            return Ok(body);
        }
    }
    let body = Arc::new(EncodedBody::encode(html, text)?);
    let mut recent = RECENT_BODIES.lock().unwrap_or_else(PoisonError::into_inner);
    recent.push_front((html.to_owned(), text.to_owned(), Arc::clone(&body)));
    recent.truncate(RECENT_TEXTS_KEPT);
    Ok(body)
}

/// The body of a letter with `attachments` around its alternative; without any, the shared
/// alternative itself (the path of every letter without attachments, unchanged).
pub fn letter_body(
    html: &str,
    text: &str,
    attachments: &[AttachmentPart<'_>],
) -> Result<Arc<EncodedBody>, MessageError> {
    let alternative = encoded_body(html, text)?;
    if attachments.is_empty() {
        return Ok(alternative);
    }
    Ok(Arc::new(alternative.with_attachments(attachments)?))
}

/// A message whose headers are set and whose body is encoded: [`Draft::finish`] formats it, or
/// [`Draft::finish_signed`] after a DKIM signature is added.
pub struct Draft<'a> {
    content: Content<'a>,
    from: &'a Mailbox,
    to: Option<&'a Mailbox>,
    extra: ExtraHeaders,
    date: SystemTime,
    body: Arc<EncodedBody>,
}

/// The message's headers, per letter, over the letter's encoded body (shared by every letter
/// with the same body): `multipart/alternative` with the text made from the HTML, then the HTML.
/// `text` is [`text_of_html`] of the body, made once per letter; `to` names the one recipient of a
/// per-recipient copy, and is `None` for a BCC message.
pub fn compose<'a>(
    content: Content<'a>,
    text: &str,
    from: &'a Mailbox,
    to: Option<&'a Mailbox>,
    extra: ExtraHeaders,
) -> Result<Draft<'a>, MessageError> {
    let body = encoded_body(content.html, text)?;
    compose_over(content, body, from, to, extra)
}

/// [`compose`] over a body made already ([`letter_body`]): once per letter with attachments, for
/// all its per-recipient copies. `content.html` is not read again.
pub fn compose_over<'a>(
    content: Content<'a>,
    body: Arc<EncodedBody>,
    from: &'a Mailbox,
    to: Option<&'a Mailbox>,
    extra: ExtraHeaders,
) -> Result<Draft<'a>, MessageError> {
    check_subject(content.subject).map_err(MessageError)?;
    Ok(Draft { content, from, to, extra, date: SystemTime::now(), body })
}

/// The headers every message has, in the order lettre's builder writes them; an extra header of
/// one of these names replaces it there (`Headers::insert_raw`), which [`Draft::finish`] leaves to
/// lettre.
const FIXED_HEADERS: [&str; 8] =
    ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type", "Content-Transfer-Encoding"];

/// Header lines that many letters share, as lettre formats them: the sender's, the last
/// Subject's, this second's Date. Encoding a header (RFC 2047 words, folding) through lettre's
/// builder, which also parses back every header it checks, was 27,000 instructions a letter,
/// more than anything else in composing it (issue 23).
struct RecentLines {
    from: Option<(Mailbox, String)>,
    subject: Option<(String, String)>,
    /// Seconds since the epoch; a Date header names whole seconds.
    date: Option<(u64, String)>,
}

static RECENT_LINES: Mutex<RecentLines> = Mutex::new(RecentLines { from: None, subject: None, date: None });

/// `value` as one header line of lettre's formatting, `Name: encoded value\r\n`: the
/// `Display` of its `Headers` is lettre's only public way to a value's encoded form.
fn push_line(out: &mut String, value: HeaderValue) {
    let mut one = Headers::with_capacity(1);
    one.insert_raw(value);
    // Writing to a String cannot fail.
    let _ = fmt::Write::write_fmt(out, format_args!("{one}"));
}

/// `name: value` as lettre writes it: as is when lettre's encoder would leave it so, else
/// through `encoded`, lettre's own value. lettre encodes a word with a byte outside ASCII or a
/// NUL, CR or LF, and folds only at a space and only past 76 characters: a value of the other
/// bytes without a space, or whose line fits in 76, is written unchanged. That is every
/// Message-ID, most single-link headers and most Subjects; encoding them cost ~1,700
/// instructions each per letter.
fn push_value(out: &mut String, name: &str, value: String, encoded: impl FnOnce(String) -> HeaderValue) {
    match is_plain(name, &value) {
        true => push_plain(out, name, &value),
        false => push_line(out, encoded(value)),
    }
}

/// `name: value` written as is; see [`is_plain`].
fn push_plain(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str(": ");
    out.push_str(value);
    out.push_str("\r\n");
}

/// See [`push_value`].
fn is_plain(name: &str, value: &str) -> bool {
    /// lettre's line length before it folds (`email_encoding`'s `MAX_LINE_LEN`).
    const FOLD_PAST: usize = 76;
    value.bytes().all(|b| matches!(b, 1..=9 | 11 | 12 | 14..=127))
        && (name.len() + 2 + value.len() <= FOLD_PAST || !value.contains(' '))
}

fn line_of(value: HeaderValue) -> String {
    let mut line = String::new();
    push_line(&mut line, value);
    line
}

/// The line `entry` keeps for `key`, made by `make` when it keeps another.
fn recent_line<K: PartialEq + ToOwned + ?Sized>(
    entry: &mut Option<(K::Owned, String)>,
    key: &K,
    make: impl FnOnce() -> HeaderValue,
) -> String {
    match entry {
        Some((kept, line)) if std::borrow::Borrow::<K>::borrow(kept) == key => line.clone(),
        _ => {
            let line = line_of(make());
            *entry = Some((key.to_owned(), line.clone()));
            line
        }
    }
}

impl Draft<'_> {
    /// The message, checked against SMTP's line limit: the headers formatted for this letter,
    /// over the shared body, which is not copied here but once, dot-stuffed, into the
    /// connection's buffer ([`crate::smtp::transaction::write_data`]). Written line by line as
    /// lettre's builder and `Message::formatted` write them
    /// (`messages_are_byte_for_byte_those_of_the_old_path`).
    pub fn finish(self) -> Result<Composed, MessageError> {
        let collides = |name: &HeaderName| FIXED_HEADERS.iter().any(|fixed| name.eq_ignore_ascii_case(fixed));
        if self.extra.iter().any(|(name, _)| collides(name)) {
            // An extra header that replaces a fixed one: lettre's builder places it.
            return self.finish_signed(|_| {});
        }
        let mut head = String::with_capacity(512);
        {
            // The lines are whole in any state, so a poisoned lock is used as is.
            let mut recent = RECENT_LINES.lock().unwrap_or_else(PoisonError::into_inner);
            let from = self.from;
            head.push_str(&recent_line(&mut recent.from, from, || {
                header::From::from(Mailboxes::from(from.clone())).display()
            }));
            match self.to {
                Some(to) => push_line(&mut head, header::To::from(Mailboxes::from(to.clone())).display()),
                None => head.push_str(&UNDISCLOSED_LINE),
            }
            let subject = self.content.subject;
            match is_plain(&header::Subject::name(), subject) {
                true => push_plain(&mut head, &header::Subject::name(), subject),
                false => head.push_str(&recent_line(&mut recent.subject, subject, || {
                    header::Subject::from(subject.to_owned()).display()
                })),
            }
            let date = self.date;
            match date.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(since) => head
                    .push_str(&recent_line(&mut recent.date, &since.as_secs(), || header::Date::new(date).display())),
                Err(_) => push_line(&mut head, header::Date::new(date).display()),
            }
        }
        push_value(&mut head, &header::MessageId::name(), self.message_id(), |id| {
            header::MessageId::from(id).display()
        });
        for (name, value) in self.extra {
            push_value(&mut head, &name, value, |value| HeaderValue::new(name.clone(), value));
        }
        head.push_str(&MIME_VERSION_LINE);
        head.push_str(&self.body.content_type_line);
        head.push_str(&SEVEN_BIT_LINE);
        head.push_str("\r\n");
        check_lines(longest_line(head.as_bytes()).max(self.body.longest_line))?;
        Ok(Composed(Parts::Over { head: head.into_bytes(), body: self.body }))
    }

    /// The message signed by `sign` (which adds a DKIM-Signature header), then formatted: the
    /// signer reads the body from the message, so it gets a copy of the shared one.
    pub fn finish_signed(self, sign: impl FnOnce(&mut lettre::Message)) -> Result<Composed, MessageError> {
        let mut message = self.message(self.body.bytes.clone())?;
        sign(&mut message);
        let raw = message.formatted();
        let headers = raw.len() - self.body.bytes.len();
        check_lines(longest_line(&raw[..headers]).max(self.body.longest_line))?;
        Ok(Composed::whole(raw))
    }

    fn message_id(&self) -> String {
        format!("<{}@{}>", self.content.id, self.from.email.domain())
    }

    /// The message as lettre's builder makes it, over `body` (the encoded body, or nothing to
    /// format the headers alone with the same Content-Transfer-Encoding).
    fn message(&self, body: Vec<u8>) -> Result<lettre::Message, MessageError> {
        let from = self.from;
        // lettre needs an envelope to format a message whose headers name no recipient; the SMTP
        // envelope is written by our client, so this one is never used.
        let envelope = lettre::address::Envelope::new(Some(from.email.clone()), vec![from.email.clone()])
            .map_err(|e| MessageError(e.to_string()))?;
        let builder = lettre::Message::builder().from(from.clone());
        let builder = match self.to {
            Some(to) => builder.to(to.clone()),
            None => builder.header(UndisclosedRecipients),
        };
        let mut builder = builder
            .subject(self.content.subject)
            .date(self.date)
            .message_id(Some(self.message_id()))
            .envelope(envelope);
        for (name, value) in &self.extra {
            builder = builder.raw_header(HeaderValue::new(name.clone(), value.clone()));
        }
        // The multipart goes in as a raw body with its Content-Type among the message's headers:
        // lettre keeps a MIME body's Content-Type with the body, where its DKIM signer does not see
        // it, and a signature naming Content-Type would then not verify.
        let content_type =
            ContentType::parse(&self.body.content_type).map_err(|e| MessageError(format!("Content-Type: {e}")))?;
        builder
            .header(MIME_VERSION_1_0)
            .header(content_type)
            .body(Body::dangerous_pre_encoded(body, ContentTransferEncoding::SevenBit))
            .map_err(|e| MessageError(e.to_string()))
    }
}

static UNDISCLOSED_LINE: LazyLock<String> = LazyLock::new(|| line_of(UndisclosedRecipients.display()));
static MIME_VERSION_LINE: LazyLock<String> = LazyLock::new(|| line_of(MIME_VERSION_1_0.display()));
static SEVEN_BIT_LINE: LazyLock<String> = LazyLock::new(|| line_of(ContentTransferEncoding::SevenBit.display()));

/// The longest line of `bytes`, without its line end (CRLF or a bare LF).
fn longest_line(bytes: &[u8]) -> usize {
    let mut longest = 0;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len())) {
        let line = &bytes[start..end];
        longest = longest.max(line.strip_suffix(b"\r").unwrap_or(line).len());
        start = end + 1;
    }
    longest
}

fn check_lines(longest: usize) -> Result<(), MessageError> {
    if longest > MAX_LINE_OCTETS {
        return Err(MessageError(format!("a line of {longest} octets exceeds SMTP's {MAX_LINE_OCTETS}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The message path as it was before the shared encoded bodies (commit ab88d6a), kept to show
    /// the new one writes the same bytes.
    mod before {
        use super::super::{Content, ExtraHeaders, MAX_LINE_OCTETS, UndisclosedRecipients, check_subject};
        use lettre::message::{
            Body, Mailbox, MultiPart,
            header::{ContentTransferEncoding, ContentType, HeaderValue, MIME_VERSION_1_0},
        };
        use std::time::SystemTime;

        pub fn normalize_line_ends(text: &str) -> String {
            let mut out = String::with_capacity(text.len() + text.len() / 32);
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\r' => {
                        if chars.peek() == Some(&'\n') {
                            chars.next();
                        }
                        out.push_str("\r\n");
                    }
                    '\n' => out.push_str("\r\n"),
                    c => out.push(c),
                }
            }
            out
        }

        pub fn compose(
            content: Content<'_>,
            text: &str,
            from: &Mailbox,
            to: Option<&Mailbox>,
            extra: ExtraHeaders,
        ) -> Result<lettre::Message, String> {
            check_subject(content.subject)?;
            let domain = from.email.domain();
            let envelope = lettre::address::Envelope::new(Some(from.email.clone()), vec![from.email.clone()])
                .map_err(|e| e.to_string())?;
            let builder = lettre::Message::builder().from(from.clone());
            let builder = match to {
                Some(to) => builder.to(to.clone()),
                None => builder.header(UndisclosedRecipients),
            };
            let mut builder = builder
                .subject(content.subject)
                .date(SystemTime::now())
                .message_id(Some(format!("<{}@{}>", content.id, domain)))
                .envelope(envelope);
            for (name, value) in extra {
                builder = builder.raw_header(HeaderValue::new(name, value));
            }
            let html = normalize_line_ends(content.html);
            let text = normalize_line_ends(text);
            let alternative = MultiPart::alternative_plain_html(text, html);
            let content_type =
                ContentType::parse(&format!("multipart/alternative; boundary=\"{}\"", alternative.boundary()))
                    .map_err(|e| format!("Content-Type: {e}"))?;
            let mut formatted = alternative.formatted();
            let body_start =
                formatted.windows(4).position(|w| w == b"\r\n\r\n").ok_or("the multipart has no header end")?;
            formatted.drain(..body_start + 4);
            let body = formatted;
            if !body.is_ascii() || body.contains(&0) {
                return Err("the multipart is not 7-bit".to_owned());
            }
            let body = Body::dangerous_pre_encoded(body, ContentTransferEncoding::SevenBit);
            builder.header(MIME_VERSION_1_0).header(content_type).body(body).map_err(|e| e.to_string())
        }

        pub fn finish(message: &lettre::Message) -> Result<Vec<u8>, String> {
            let raw = message.formatted();
            if let Some(longest) = raw.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l).len()).max()
                && longest > MAX_LINE_OCTETS
            {
                return Err(format!("a line of {longest} octets exceeds SMTP's {MAX_LINE_OCTETS}"));
            }
            Ok(raw)
        }
    }

    /// The boundary a message's Content-Type names.
    fn boundary_of(raw: &str) -> String {
        let at = raw.find("boundary=\"").unwrap() + "boundary=\"".len();
        raw[at..at + raw[at..].find('"').unwrap()].to_owned()
    }

    /// `raw` with its Date line and MIME boundary replaced by fixed ones, the two things that
    /// differ between two formattings of one letter.
    fn comparable(raw: &[u8]) -> String {
        let raw = String::from_utf8(raw.to_vec()).unwrap();
        let raw = raw.replace(&boundary_of(&raw), "BOUNDARY");
        let date = raw.find("\r\nDate: ").unwrap() + 2;
        let end = date + raw[date..].find("\r\n").unwrap();
        format!("{}Date: DATE{}", &raw[..date], &raw[end..])
    }

    /// Bodies that exercise every encoding path: long lines, bare CR and LF, leading dots, UTF-8
    /// and 8-bit text, control characters, trailing spaces, an empty body.
    fn tricky_bodies() -> Vec<String> {
        vec![
            "<p>Hi there</p>".to_owned(),
            String::new(),
            format!("<p>{}</p>", "x".repeat(5_000)),
            format!("<p>{}</p>\n<p>{}</p>", "word ".repeat(400), "Ж".repeat(3_000)),
            "line one\rline two\nline three\r\n\r\rline five\n\n".to_owned(),
            ".starts with a dot\n.\n..two dots\r\n.\r\nend.".to_owned(),
            "<p>Grüße — 你好 — 👋🏽 — Привет</p>\n.Ünïcödé at a line start\r".to_owned(),
            "Latin-1 range: \u{e9}\u{e8}\u{ff}\u{a0}\u{b5}, controls \u{1}\u{7f}\t tab, trailing spaces   \nnext"
                .to_owned(),
            format!("{}\n.dot\rcr\r\nend", "Ж".repeat(20_000)),
            format!("<html><body>{}</body></html>", "<p>Lorem ipsum dolor sit amet.</p>\n".repeat(2_500)),
        ]
    }

    #[test]
    fn messages_are_byte_for_byte_those_of_the_old_path() {
        let senders: [Mailbox; 2] =
            ["Mailer Ünï <noreply@example.com>".parse().unwrap(), "news@example.net".parse().unwrap()];
        let to: Mailbox = "alice@example.org".parse().unwrap();
        let unsubscribe = || -> ExtraHeaders {
            vec![
                (
                    HeaderName::new_from_ascii_str("List-Unsubscribe"),
                    "<https://u.example.com/u?t=1&sig=abc>, <mailto:u@example.com?subject=unsubscribe%20x>".to_owned(),
                ),
                (HeaderName::new_from_ascii_str("List-Unsubscribe-Post"), "List-Unsubscribe=One-Click".to_owned()),
            ]
        };
        // An extra header that replaces a fixed one, where lettre's builder places it.
        let replacing = || -> ExtraHeaders { vec![(HeaderName::new_from_ascii_str("message-id"), "<x@y>".to_owned())] };
        let long_subject = "word ".repeat(150);
        let mut compared = 0;
        for body in tricky_bodies() {
            let text = text_of_html(&body).unwrap();
            for subject in ["Hello", "Привет, мир ✓", long_subject.as_str()] {
                for (to, extra) in [(None, Vec::new()), (Some(&to), unsubscribe()), (None, replacing())] {
                    // Twice: the second from the shared encoded body (and the lines kept), from
                    // each sender in turn.
                    for from in [&senders[0], &senders[1], &senders[0]] {
                        let content = content(subject, &body);
                        let old = before::finish(&before::compose(content, &text, from, to, extra.clone()).unwrap());
                        let new = compose(content, &text, from, to, extra.clone()).unwrap().finish();
                        match (old, new) {
                            (Ok(old), Ok(new)) => {
                                assert_eq!(comparable(&new.to_bytes()), comparable(&old), "body {body:?}");
                                // On the wire: the parts written into the connection's buffer
                                // are the old message written whole, dot-stuffed as before
                                // (the loop of commit ab88d6a).
                                let mut data = Vec::new();
                                crate::smtp::transaction::write_data(&mut data, &new.parts());
                                assert_eq!(
                                    comparable(&data),
                                    comparable(&crate::smtp::transaction::tests::dot_stuffed_before(&old)),
                                    "body {body:?}"
                                );
                                assert_eq!(new.len(), old.len());
                                assert_eq!(new.is_ascii(), old.is_ascii());
                            }
                            (Err(old), Err(new)) => {
                                assert_eq!(new.to_string(), format!("cannot build the message: {old}"))
                            }
                            (old, new) => panic!("old {old:?}, new {new:?} for {body:?}"),
                        }
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, tricky_bodies().len() * 3 * 3 * 3);
    }

    /// A value written as is is the line lettre's encoder writes for it, and one it would encode
    /// or fold goes through lettre.
    #[test]
    fn plain_header_values_are_written_as_lettre_writes_them() {
        let long = format!("<{}@example.com>", "a".repeat(300));
        for value in [
            "<65a1b2c3d4e5f60718293a4b@example.com>",
            "",
            long.as_str(),
            "<https://u.example.com/u?t=1&sig=abc>",
            "<https://u.example.com/u?t=1>, <mailto:u@example.com?subject=unsubscribe%20x>",
            "tab\there",
            "Grüße",
            "=?utf-8?q?x?=",
            " leading",
            "trailing ",
            &"word ".repeat(40),
            "Benchmark letter cg1234 17",
            "two  spaces",
            "   ",
        ]
        .into_iter()
        .map(str::to_owned)
        // Lines of 74 to 79 characters with a space to fold at, for both names.
        .chain((50..62).map(|n| format!("{} x", "a".repeat(n))))
        {
            for name in ["Subject", "List-Unsubscribe"] {
                let name = HeaderName::new_from_ascii_str(name);
                let mut direct = String::new();
                push_value(&mut direct, &name, value.clone(), |v| HeaderValue::new(name.clone(), v));
                assert_eq!(direct, line_of(HeaderValue::new(name.clone(), value.clone())), "{name}: {value:?}");
            }
        }
    }

    /// The Date line is lettre's for the message's second, whichever letter of that second made
    /// it first.
    #[test]
    fn a_date_line_is_lettres_for_its_second() {
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        let date_line = |raw: &[u8]| {
            let raw = String::from_utf8(raw.to_vec()).unwrap();
            let at = raw.find("\r\nDate: ").unwrap() + 2;
            raw[at..at + raw[at..].find("\r\n").unwrap() + 2].to_owned()
        };
        let second = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for at in [second, second + Duration::from_millis(999), second + Duration::from_secs(1), second] {
            let mut draft = compose(content("Hi", "<p>x</p>"), "x", &from, None, Vec::new()).unwrap();
            draft.date = at;
            let raw = draft.finish().unwrap().to_bytes().into_owned();
            assert_eq!(date_line(&raw), line_of(header::Date::new(at).display()), "{at:?}");
        }
    }

    #[test]
    fn a_line_too_long_is_refused_as_before() {
        // A subject word longer than a line: lettre cannot fold it.
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        let long = format!("<{}>", "u".repeat(1_200));
        let extra = || vec![(HeaderName::new_from_ascii_str("List-Unsubscribe"), long.clone())];
        let content = content("Hello", "<p>x</p>");
        let old = before::finish(&before::compose(content, "x", &from, None, extra()).unwrap()).unwrap_err();
        let new = compose(content, "x", &from, None, extra()).unwrap().finish().unwrap_err();
        assert_eq!(new.to_string(), format!("cannot build the message: {old}"));
    }

    #[test]
    fn letters_with_one_body_share_its_encoding() {
        let body = "<p>one body for a campaign, shared</p>";
        let text = text_of_html(body).unwrap();
        let first = encoded_body(body, &text).unwrap();
        let second = encoded_body(body, &text).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        let other = encoded_body("<p>another body</p>", &text).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_ne!(first.bytes, other.bytes);
    }

    #[test]
    fn a_signed_message_is_the_unsigned_one_with_a_signature_header() {
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        let body = "<p>signed</p>\n.dot";
        let text = text_of_html(body).unwrap();
        let header = HeaderName::new_from_ascii_str("DKIM-Signature");
        let unsigned = compose(content("Hi", body), &text, &from, None, Vec::new())
            .unwrap()
            .finish()
            .unwrap()
            .to_bytes()
            .into_owned();
        let signed = compose(content("Hi", body), &text, &from, None, Vec::new())
            .unwrap()
            .finish_signed(|m| m.headers_mut().insert_raw(HeaderValue::new(header, "v=1; test".to_owned())))
            .unwrap();
        let signed = comparable(&signed.to_bytes());
        let signature = signed.find("DKIM-Signature: v=1; test\r\n").unwrap();
        let without =
            format!("{}{}", &signed[..signature], &signed[signature + "DKIM-Signature: v=1; test\r\n".len()..]);
        assert_eq!(without, comparable(&unsigned));
    }

    #[test]
    fn line_ends_normalise_as_before() {
        for body in tricky_bodies() {
            assert_eq!(normalize_line_ends(&body), before::normalize_line_ends(&body));
        }
        for text in ["\r", "\n", "\r\n", "\r\r\n\n", "a\r", "\u{e9}\r\u{e9}\n\u{e9}"] {
            assert_eq!(normalize_line_ends(text), before::normalize_line_ends(text), "{text:?}");
        }
    }

    const ADDRESSES: [&str; 2] = ["alice@example.org", "bob@example.net"];

    fn content<'a>(subject: &'a str, html: &'a str) -> Content<'a> {
        Content { id: "65a1b2c3d4e5f60718293a4b", subject, html }
    }

    fn headers(raw: &str) -> &str {
        raw.split("\r\n\r\n").next().unwrap()
    }

    #[test]
    fn has_the_required_headers_and_no_recipient() {
        let from: Mailbox = "Mailer <noreply@example.com>".parse().unwrap();
        let raw = String::from_utf8(build(content("Hello", "<p>Hi there</p>"), &from).unwrap()).unwrap();
        let head = headers(&raw);
        for needle in [
            "From: Mailer <noreply@example.com>",
            "Subject: Hello",
            "Date: ",
            "MIME-Version: 1.0",
            "Content-Type: multipart/alternative;",
            "To: undisclosed-recipients:;",
            "Message-ID: <65a1b2c3d4e5f60718293a4b@example.com>",
        ] {
            assert!(head.contains(needle), "missing {needle:?} in\n{head}");
        }
        for address in ADDRESSES {
            assert!(!head.to_lowercase().contains(address), "{address} leaked into\n{head}");
        }
        assert!(!head.contains("Bcc"), "{head}");
    }

    #[test]
    fn non_ascii_subject_is_encoded_and_body_is_7bit() {
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        let raw = build(content("Привет, мир ✓", "<p>Grüße — 你好</p>"), &from).unwrap();
        let text = String::from_utf8(raw.clone()).unwrap();
        assert!(headers(&text).contains("Subject: =?utf-8?"), "subject not RFC 2047 encoded:\n{text}");
        assert!(raw.is_ascii(), "the whole message should be 7-bit after transfer encoding");
    }

    #[test]
    fn subject_with_line_breaks_or_too_long_is_refused() {
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        assert!(build(content("hi\r\nBcc: evil@example.org", "x"), &from).is_err());
        let long = "x".repeat(SUBJECT_MAX_CHARS + 1);
        assert!(build(content(&long, "x"), &from).unwrap_err().to_string().contains("at most 900"));
        let longest = "y".repeat(SUBJECT_MAX_CHARS);
        assert!(build(content(&longest, "x"), &from).is_ok());
    }

    #[test]
    fn long_subjects_and_bodies_keep_every_line_within_998_octets() {
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        let words = "word ".repeat(180);
        let cyrillic = "Щ".repeat(SUBJECT_MAX_CHARS);
        let body = format!("{}\n.dot\rcr\r\nend", "Ж".repeat(20_000));
        for subject in [words.trim(), cyrillic.as_str(), &"z".repeat(SUBJECT_MAX_CHARS)] {
            let raw = build(content(subject, &body), &from).unwrap();
            let longest = raw.split(|b| *b == b'\n').map(<[u8]>::len).max().unwrap();
            assert!(longest <= MAX_LINE_OCTETS + 1, "a line of {longest} octets");
        }
    }

    #[test]
    fn text_alternative_keeps_text_and_links_without_tags() {
        let text =
            text_of_html(r#"<h1>Sale</h1><p>Read <a href="https://example.com/offer">the offer</a>.</p>"#).unwrap();
        assert!(text.contains("Sale") && text.contains("the offer"), "{text}");
        assert!(text.contains("https://example.com/offer"), "{text}");
        assert!(!text.contains('<'), "{text}");
    }

    #[test]
    fn recent_texts_answer_for_their_own_body_only() {
        // More bodies than the list keeps, each asked for twice in turn: every answer is its own
        // body's text, the repeat (served from the list) equal to the first rendering.
        let bodies: Vec<String> = (0..RECENT_TEXTS_KEPT + 3).map(|i| format!("<p>body number {i}</p>")).collect();
        for body in bodies.iter().chain(bodies.iter().rev()) {
            let text = text_of_html(body).unwrap();
            assert_eq!(text, render_text(body).unwrap());
            assert!(text.contains(&body[3..body.len() - 4]), "{text:?} for {body}");
        }
        let kept = RECENT_TEXTS.lock().unwrap().len();
        assert!(kept <= RECENT_TEXTS_KEPT, "{kept}");
    }

    #[test]
    fn a_long_body_costs_a_bounded_text_part() {
        let html = format!("<p>{}</p>", "a newsletter with inline images ".repeat(20_000));
        let started = std::time::Instant::now();
        let text = text_of_html(&html).unwrap();
        assert!(text.len() < 2 * TEXT_FROM_HTML_MAX_BYTES, "{} bytes", text.len());
        assert!(text.ends_with("[The rest of this message is in its HTML version.]\n"));
        eprintln!("text of a {} KB body in {:?}", html.len() / 1000, started.elapsed());
    }

    /// A message over `body`, as the composer makes one.
    fn message_over(body: Arc<EncodedBody>) -> Vec<u8> {
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        let composed = compose_over(content("Files", "<p>unused here</p>"), body, &from, None, Vec::new()).unwrap();
        composed.finish().unwrap().to_bytes().into_owned()
    }

    fn part<'a>(name: &'a str, content_type: &'a str, id: Option<&'a str>, content: &'a [u8]) -> AttachmentPart<'a> {
        AttachmentPart { file_name: name, content_type, content_id: id, content }
    }

    #[test]
    fn a_letter_without_attachments_keeps_the_shared_body() {
        let html = "<p>no files in this one</p>";
        let text = text_of_html(html).unwrap();
        let shared = encoded_body(html, &text).unwrap();
        let body = letter_body(html, &text, &[]).unwrap();
        assert!(Arc::ptr_eq(&shared, &body), "a letter without attachments must take the shared body");
        let with = letter_body(html, &text, &[part("a.txt", "text/plain", None, b"a")]).unwrap();
        assert!(!Arc::ptr_eq(&shared, &with));
        // The shared body is left as it was.
        assert!(shared.content_type.starts_with("multipart/alternative;"), "{}", shared.content_type);
    }

    #[test]
    fn attachments_go_around_the_alternative_byte_for_byte() {
        use mail_parser::{MessageParser, MimeHeaders};
        let html = r#"<p>Invoice <img src="cid:logo@example.com"></p>"#;
        let text = text_of_html(html).unwrap();
        let binary: Vec<u8> = (0..=255u8).cycle().take(5_000).collect();
        let long_name = format!("{}.pdf", "Ж".repeat(FILE_NAME_CHARS_TESTED));
        let file = part("all-bytes.bin", "application/octet-stream", None, &binary);
        let named = part("Счёт «1» \\ \"q\".pdf", "application/pdf; charset=binary", None, b"%PDF-1.7");
        let long = part(&long_name, "application/pdf", None, b"long");
        let logo = part("logo.png", "image/png", Some("logo@example.com"), b"\x89PNG\r\n\x1a\n");
        for (parts, top, related) in [
            (vec![file, named, long], "mixed", false),
            (vec![logo], "related", true),
            (vec![file, logo, named], "mixed", true),
        ] {
            let raw = message_over(letter_body(html, &text, &parts).unwrap());
            let shown = String::from_utf8(raw.clone()).expect("7-bit");
            assert!(raw.is_ascii(), "{shown}");
            assert!(longest_line(&raw) <= 78, "a line of {} octets in\n{shown}", longest_line(&raw));
            let message = MessageParser::default().parse(&raw).unwrap();
            assert_eq!(message.content_type().unwrap().subtype(), Some(top), "{shown}");
            assert_eq!((message.text_body.len(), message.html_body.len()), (1, 1), "{shown}");
            assert_eq!(message.body_html(0).unwrap(), html);
            let nested_related =
                message.parts.iter().find(|p| p.content_type().and_then(|c| c.subtype()) == Some("related"));
            assert_eq!(nested_related.is_some(), related, "{shown}");
            if let Some(related) = nested_related {
                assert_eq!(related.content_type().unwrap().attribute("type"), Some("multipart/alternative"));
            }
            for expected in &parts {
                let found = match expected.content_id {
                    Some(id) => message.parts.iter().find(|p| p.content_id() == Some(id)),
                    None => message.parts.iter().find(|p| p.attachment_name() == Some(expected.file_name)),
                };
                let found = found.unwrap_or_else(|| panic!("{:?} missing from\n{shown}", expected.file_name));
                assert_eq!(found.contents(), expected.content, "{:?}", expected.file_name);
                let disposition = found.content_disposition().unwrap();
                assert_eq!(disposition.ctype(), if expected.content_id.is_some() { "inline" } else { "attachment" });
                assert_eq!(found.content_type().unwrap().attribute("name"), Some(expected.file_name), "{shown}");
                assert_eq!(found.content_transfer_encoding(), Some("base64"));
            }
        }
    }

    /// Characters of the longest file name tried: `crate::attachments` allows 255.
    const FILE_NAME_CHARS_TESTED: usize = 251;

    #[test]
    fn file_names_are_encoded_and_base64_lines_are_76() {
        let text = text_of_html("<p>x</p>").unwrap();
        let content: Vec<u8> = (0..1_000u32).map(|i| (i % 256) as u8).collect();
        let body = letter_body("<p>x</p>", &text, &[part("März.pdf", "application/pdf", None, &content)]).unwrap();
        let shown = String::from_utf8(body.bytes.clone()).unwrap();
        assert!(shown.contains("filename*0*=utf-8''M%C3%A4rz.pdf"), "RFC 2231 in Content-Disposition:\n{shown}");
        assert!(shown.contains("name=\"=?utf-8?b?TcOkcnoucGRm?=\""), "RFC 2047 in Content-Type:\n{shown}");
        assert!(!shown.contains("März"), "{shown}");
        let start = shown.find("Content-Transfer-Encoding: base64\r\n\r\n").unwrap();
        let lines: Vec<&str> =
            shown[start..].split("\r\n").skip(2).take_while(|l| !l.is_empty() && !l.starts_with("--")).collect();
        assert_eq!(lines.len(), 1_000usize.div_ceil(57), "{lines:?}");
        assert!(lines[..lines.len() - 1].iter().all(|l| l.len() == 76), "{lines:?}");
    }

    #[test]
    fn a_signed_message_with_attachments_carries_them_under_the_signature() {
        let from: Mailbox = "noreply@example.com".parse().unwrap();
        let text = text_of_html("<p>x</p>").unwrap();
        let body =
            letter_body("<p>x</p>", &text, &[part("a.bin", "application/octet-stream", None, &[0, 1, 2])]).unwrap();
        let header = HeaderName::new_from_ascii_str("DKIM-Signature");
        let signed = compose_over(content("Hi", "<p>x</p>"), body, &from, None, Vec::new())
            .unwrap()
            .finish_signed(|m| m.headers_mut().insert_raw(HeaderValue::new(header, "v=1; test".to_owned())))
            .unwrap();
        let shown = String::from_utf8(signed.to_bytes().into_owned()).unwrap();
        assert!(headers(&shown).contains("Content-Type: multipart/mixed;"), "{shown}");
        assert!(headers(&shown).contains("DKIM-Signature: v=1; test"), "{shown}");
        assert!(shown.contains("filename=\"a.bin\"") && shown.contains("AAEC"), "{shown}");
    }

    #[test]
    fn bare_cr_and_lf_become_crlf() {
        assert_eq!(normalize_line_ends("a\nb\rc\r\nd\r"), "a\r\nb\r\nc\r\nd\r\n");
        assert_eq!(normalize_line_ends("no breaks"), "no breaks");
    }
}
