//! Issue 19, attachments, against the real binary and the local stack: files and inline images
//! arrive at the relay byte for byte (parsed with `mail-parser`, as a mail client would), in BCC
//! and in individual delivery, DKIM-signed; over-limit, bad base64 and wrong types are refused at
//! `/post` naming the field and the limit, and fail only their own letter when produced straight
//! to Kafka.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use mail_parser::{MessageParser, MimeHeaders};
use mailsender::model::Status;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Every byte value, twice, and a run long enough for many base64 lines.
fn binary_file() -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    bytes.extend((0..3000u32).map(|i| (i * 7 % 251) as u8));
    bytes
}

/// A PNG's signature and some bytes: what matters is that they come back unchanged.
fn image() -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    bytes.extend((0..500u32).map(|i| (i % 256) as u8));
    bytes
}

const NON_ASCII_NAME: &str = "Счёт №17 — März «финал».pdf";
const CONTENT_ID: &str = "logo.2026@mailsender.test";

fn pdf() -> Vec<u8> {
    b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n.\n..leading dots\r\n%%EOF\n".to_vec()
}

fn mailing(tag: &str, attachments: Value) -> Value {
    let mut mailing = json!({
        "Subject": format!("{tag} subject"),
        "Body": format!("<p>{tag}</p><p><img src=\"cid:{CONTENT_ID}\" alt=\"logo\"></p>"),
        "Addresses": [format!("{tag}@example.org")],
        "Token": format!("token-{tag}"),
    });
    if !attachments.is_null() {
        mailing["Attachments"] = attachments;
    }
    mailing
}

/// The three files of the tests: a binary one, one with a non-ASCII name, an inline image.
fn three_files() -> Value {
    json!([
        { "FileName": "all-bytes.bin", "ContentType": "application/octet-stream", "Content": b64(&binary_file()) },
        { "FileName": NON_ASCII_NAME, "ContentType": "application/pdf", "Content": b64(&pdf()) },
        { "FileName": "logo.png", "ContentType": "image/png", "Content": b64(&image()), "ContentId": CONTENT_ID },
    ])
}

/// Checks that `raw` carries the three files byte for byte, as a mail client reads them: the
/// files as attachments of a `multipart/mixed`, the image inline in a `multipart/related` beside
/// the HTML that names it.
fn assert_three_files(raw: &[u8]) {
    let text = String::from_utf8_lossy(raw);
    let message = MessageParser::default().parse(raw).expect("a parsable message");
    let top = message.content_type().expect("a Content-Type");
    assert_eq!((top.ctype(), top.subtype()), ("multipart", Some("mixed")), "{text}");
    let named = |name: &str| {
        message
            .parts
            .iter()
            .find(|part| part.attachment_name() == Some(name))
            .unwrap_or_else(|| panic!("no part named {name:?} in\n{text}"))
    };
    let binary = named("all-bytes.bin");
    assert_eq!(binary.contents(), binary_file().as_slice(), "the binary file changed");
    assert_eq!(binary.content_disposition().map(|d| d.ctype()), Some("attachment"));
    let document = named(NON_ASCII_NAME);
    assert_eq!(document.contents(), pdf().as_slice(), "the PDF changed");
    let document_type = document.content_type().unwrap();
    assert_eq!((document_type.ctype(), document_type.subtype()), ("application", Some("pdf")));
    // The older clients' place for the name, Content-Type's `name`, says the same.
    assert_eq!(document_type.attribute("name"), Some(NON_ASCII_NAME), "{text}");
    let logo = message
        .parts
        .iter()
        .find(|part| part.content_id().map(|id| id.trim_matches(['<', '>'])) == Some(CONTENT_ID))
        .unwrap_or_else(|| panic!("no part with Content-ID {CONTENT_ID} in\n{text}"));
    assert_eq!(logo.contents(), image().as_slice(), "the image changed");
    assert_eq!(logo.content_disposition().map(|d| d.ctype()), Some("inline"));
    let related = message
        .parts
        .iter()
        .find(|part| part.content_type().is_some_and(|c| c.subtype() == Some("related")))
        .unwrap_or_else(|| panic!("no multipart/related in\n{text}"));
    assert_eq!(related.content_type().unwrap().attribute("type"), Some("multipart/alternative"));
    // The HTML and its text alternative are still there, once each.
    assert_eq!((message.text_body.len(), message.html_body.len()), (1, 1), "{text}");
    assert!(message.body_html(0).unwrap().contains(&format!("cid:{CONTENT_ID}")));
    // Base64 in lines of 76, the file name not raw in any header.
    let binary_start = text.find("filename=\"all-bytes.bin\"").unwrap();
    let body_start = binary_start + text[binary_start..].find("\r\n\r\n").unwrap() + 4;
    let lines: Vec<&str> =
        text[body_start..].split("\r\n").take_while(|l| !l.is_empty() && !l.starts_with("--")).collect();
    assert!(lines.len() > 10, "{lines:?}");
    assert!(lines[..lines.len() - 1].iter().all(|l| l.len() == 76), "{lines:?}");
    assert!(!text.contains("Счёт"), "a raw non-ASCII name in the message:\n{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn attachments_arrive_byte_for_byte_and_letters_without_stay_as_they_were() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let batch = json!([mailing("files", three_files()), mailing("plain", Value::Null)]);
    let (code, answer) = app.post("/post", batch.to_string()).await;
    assert_eq!(code, 202, "{answer}");
    let received = sink.wait_for_count(2, LONG).await;
    let files = received.iter().find(|m| m.rcpt_tos == ["files@example.org"]).unwrap();
    assert_three_files(&files.bytes());

    // Its sibling without attachments is today's multipart/alternative, nothing around it.
    let plain = received.iter().find(|m| m.rcpt_tos == ["plain@example.org"]).unwrap();
    let content_type = plain.header("Content-Type").unwrap();
    assert!(content_type.starts_with("multipart/alternative;"), "{}", plain.raw);
    assert!(!plain.raw.contains("Content-Disposition"), "{}", plain.raw);

    // Stored decoded, as BSON binary, and counted in the letter's size for the claim.
    let letters = app.wait_all_final(2, LONG).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent), "{letters:?}");
    let raw = app.raw_letters().await;
    let stored =
        raw.iter().find(|d| d.get_array("addresses").unwrap()[0].as_str() == Some("files@example.org")).unwrap();
    let attachments = stored.get_array("attachments").unwrap();
    assert_eq!(attachments.len(), 3);
    let first = attachments[0].as_document().unwrap();
    assert_eq!(first.get_binary_generic("content").unwrap(), &binary_file());
    let files_bytes = (binary_file().len() + pdf().len() + image().len()) as i64;
    // The Mongo-wire server may hand a small integer back as int32.
    let size = stored.get("size_bytes").and_then(|s| s.as_i64().or_else(|| s.as_i32().map(i64::from)));
    assert!(size.unwrap_or_default() > files_bytes, "{:?}", stored.get("size_bytes"));
    let plain_stored = raw.iter().find(|d| d.get_array("addresses").unwrap()[0].as_str() == Some("plain@example.org"));
    assert!(plain_stored.unwrap().get("attachments").is_none(), "no attachments, no field");
}

#[tokio::test(flavor = "multi_thread")]
async fn individual_copies_carry_the_attachments_too() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[("SMTP_DELIVERY", "individual")]).await;
    let mut letter = mailing("each", three_files());
    letter["Addresses"] = json!(["one@example.org", "two@example.org", "three@example.org"]);
    app.produce(Some("individual"), json!([letter]).to_string().as_bytes()).await;
    let received = sink.wait_for_count(3, LONG).await;
    for copy in &received {
        assert_eq!(copy.rcpt_tos.len(), 1, "one recipient per copy");
        assert_eq!(copy.header("To"), Some(copy.rcpt_tos[0].as_str()), "{}", copy.raw);
        assert_three_files(&copy.bytes());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_message_with_attachments_verifies() {
    let key = dkim::test_key();
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(
        &sink,
        &[
            ("DKIM_PRIVATE_KEY_FILE", key.private.to_str().unwrap()),
            ("DKIM_SELECTOR", "s2026"),
            ("DKIM_DOMAIN", "mailsender.test"),
        ],
    )
    .await;
    let (code, answer) = app.post("/post", json!([mailing("signed", three_files())]).to_string()).await;
    assert_eq!(code, 202, "{answer}");
    let received = sink.wait_for_count(1, LONG).await;
    let bytes = received[0].bytes();
    assert_three_files(&bytes);
    let name = "s2026._domainkey.mailsender.test";
    assert!(dkim::dkimpy_verifies(&bytes, &key.txt, name), "{}", received[0].raw);
    // One base64 character of an attachment altered in transit: the signature no longer holds.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let pdf_b64 = b64(&pdf());
    let at = text.find(&pdf_b64[..40]).expect("the PDF's base64 in the message");
    let mut altered = text.clone().into_bytes();
    altered[at + 10] = if altered[at + 10] == b'A' { b'B' } else { b'A' };
    assert!(!dkim::dkimpy_verifies(&altered, &key.txt, name));
}

#[tokio::test(flavor = "multi_thread")]
async fn over_limits_bad_base64_and_wrong_types_are_refused_and_fail_only_their_letter() {
    let sink = SmtpSink::start().await;
    // Letters failed at ingest are published by the republisher, once older than the producer's
    // message timeout (plus 15 s): short settings keep that within the test.
    let app = TestApp::spawn(
        &sink,
        &[
            ("ATTACHMENTS_MAX_COUNT", "2"),
            ("ATTACHMENTS_MAX_BYTES", "1000"),
            ("KAFKA_MESSAGE_TIMEOUT", "5s"),
            ("REPUBLISH_INTERVAL", "1s"),
        ],
    )
    .await;
    let file = |bytes: usize| json!({ "FileName": "f.bin", "ContentType": "application/octet-stream", "Content": b64(&vec![7u8; bytes]) });
    let bad = [
        (json!([file(10), file(10), file(10)]), "Attachments has 3 files, over the limit of 2 (ATTACHMENTS_MAX_COUNT)"),
        (
            json!([file(600), file(401)]),
            "Attachments hold 1001 bytes (decoded), over the limit of 1000 bytes (ATTACHMENTS_MAX_BYTES)",
        ),
        (
            json!([{ "FileName": "a.txt", "ContentType": "text/plain", "Content": "this is not base64!" }]),
            "Attachments[0].Content is not base64",
        ),
        (json!("invoice.pdf"), "Attachments must be an array of objects, not a string"),
        (json!([{ "FileName": 17, "Content": "aGk=" }]), "Attachments[0].FileName must be a string, not a number"),
        (
            json!([{ "FileName": "a", "Content": "aGk=", "ContentType": "pdf" }]),
            "Attachments[0].ContentType is not a MIME type",
        ),
    ];
    for (attachments, expected) in &bad {
        let body = json!([mailing("fine", Value::Null), mailing("bad", attachments.clone())]);
        let (code, answer) = app.post("/post", body.to_string()).await;
        assert_eq!(code, 400, "{attachments}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.starts_with("mailing 1: ") && error.contains(expected), "{attachments}: {error}");
    }
    // At the limits exactly: accepted.
    let (code, answer) = app.post("/post", json!([mailing("edge", json!([file(600), file(400)]))]).to_string()).await;
    assert_eq!(code, 202, "{answer}");
    sink.wait_for_count(1, LONG).await;

    // Straight to Kafka: each bad mailing fails its own letter with the reason; the good one goes,
    // its attachment with it.
    let mut mailings = vec![mailing("good", json!([file(100)]))];
    mailings
        .extend(bad.iter().enumerate().map(|(i, (attachments, _))| mailing(&format!("bad{i}"), attachments.clone())));
    app.produce(Some("mixed"), Value::Array(mailings).to_string().as_bytes()).await;
    let letters = app.wait_all_final(2 + bad.len(), LONG).await;
    for letter in letters.iter().filter(|l| l.kafkakey == "mixed") {
        let tag = letter.addresses[0].split('@').next().unwrap();
        if tag == "good" {
            assert_eq!(letter.status, Status::Sent, "{letter:?}");
            continue;
        }
        let index: usize = tag.trim_start_matches("bad").parse().unwrap();
        assert_eq!(letter.status, Status::Error, "{letter:?}");
        assert!(letter.error.as_deref().unwrap_or_default().contains(bad[index].1), "{letter:?}");
        assert!(letter.attachments.is_empty(), "a failed letter keeps no attachments");
    }
    let messages: Vec<Value> =
        app.consume(&app.topic_out, 2 + bad.len(), LONG).await.iter().map(Consumed::json).collect();
    let failed: Vec<&Value> = messages.iter().filter(|m| m["Status"] == "error").collect();
    assert_eq!(failed.len(), bad.len(), "{messages:?}");
    for message in failed {
        let index: usize = message["Addresses"][0]
            .as_str()
            .unwrap()
            .trim_start_matches("bad")
            .split('@')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(message["Error"].as_str().unwrap().contains(bad[index].1), "{message}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = sink.received();
    assert_eq!(received.len(), 2, "only the edge letter and the good one reach the relay");
    let good = received.iter().find(|m| m.rcpt_tos == ["good@example.org"]).expect("the good letter was sent");
    let bytes = good.bytes();
    let message = MessageParser::default().parse(&bytes).unwrap();
    let attachment = message.attachments().next().expect("its attachment");
    assert_eq!(attachment.contents(), vec![7u8; 100].as_slice());
}

/// DKIM test keys and dkimpy, as `tests/deliverability.rs` uses them.
mod dkim {
    use super::*;

    pub struct TestKey {
        _dir: tempfile::TempDir,
        pub private: std::path::PathBuf,
        pub txt: String,
    }

    fn openssl(args: &[&str]) -> Vec<u8> {
        let output = std::process::Command::new("openssl").args(args).output().expect("openssl");
        assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    }

    /// An RSA key made with openssl, and the DNS TXT record of its public key.
    pub fn test_key() -> TestKey {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("dkim.pem");
        let path = private.to_str().unwrap();
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path]);
        let spki = openssl(&["pkey", "-in", path, "-pubout", "-outform", "DER"]);
        TestKey { txt: format!("v=DKIM1; k=rsa; p={}", b64(&spki)), _dir: dir, private }
    }

    /// dkimpy's verdict on `message`, with the public key served from a stub instead of DNS.
    pub fn dkimpy_verifies(message: &[u8], txt: &str, expected_name: &str) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let (message_path, txt_path) = (dir.path().join("message.eml"), dir.path().join("key.txt"));
        std::fs::write(&message_path, message).unwrap();
        std::fs::write(&txt_path, txt).unwrap();
        let script = r#"
import sys, dkim
message = open(sys.argv[1], 'rb').read()
txt = open(sys.argv[2], 'rb').read()
expected = sys.argv[3].encode()
def dnsfunc(name, timeout=5):
    assert name.rstrip(b'.') == expected, name
    return txt
print('pass' if dkim.verify(message, dnsfunc=dnsfunc) else 'fail')
"#;
        let output = std::process::Command::new(python())
            .args(["-c", script])
            .arg(&message_path)
            .arg(&txt_path)
            .arg(expected_name)
            .output()
            .expect("running dkimpy");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "dkimpy: {stdout}{}", String::from_utf8_lossy(&output.stderr));
        stdout.trim() == "pass"
    }
}
