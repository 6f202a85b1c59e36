//! Mail that mailbox providers accept (issue 11): a text alternative, DKIM signatures an
//! independent verifier accepts, List-Unsubscribe with one-click, and the suppression list.

mod common;

use std::time::Duration;

use common::*;
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

fn mailing(subject: &str, body: &str, addresses: &[&str]) -> Value {
    json!({ "Subject": subject, "Body": body, "Addresses": addresses, "Token": format!("token-{subject}") })
}

/// Posts one letter and returns the one message the sink received for it.
async fn send_one(app: &TestApp, sink: &SmtpSink, subject: &str, body: &str, addresses: &[&str]) -> Received {
    let before = sink.received().len();
    let (status, reply) = app.post("/post", json!([mailing(subject, body, addresses)]).to_string()).await;
    assert_eq!(status, 202, "{reply}");
    let received = sink.wait_for_count(before + 1, LONG).await;
    received.into_iter().find(|m| m.header("Subject") == Some(subject)).expect("the message for this letter")
}

#[tokio::test]
async fn every_message_has_a_text_alternative_made_from_the_html() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let html = r#"<html><body><h1>Winter sale</h1><p>Dear reader, see <a href="https://shop.example.com/sale?id=7">our offers</a> today.</p><ul><li>Boots</li><li>Coats</li></ul></body></html>"#;
    let received = send_one(&app, &sink, "text alternative", html, &["reader@example.org"]).await;
    let bytes = received.bytes();
    let message = MessageParser::default().parse(&bytes).expect("a parsable message");
    let content_type = message.content_type().expect("a Content-Type");
    assert_eq!((content_type.ctype(), content_type.subtype()), ("multipart", Some("alternative")), "{}", received.raw);
    assert_eq!((message.text_body.len(), message.html_body.len()), (1, 1), "{}", received.raw);
    let text = message.body_text(0).expect("a text/plain part");
    let text_part = &message.parts[message.text_body[0] as usize];
    assert_eq!(text_part.content_type().map(|c| (c.ctype(), c.subtype())), Some(("text", Some("plain"))));
    for needle in ["Winter sale", "Dear reader", "our offers", "https://shop.example.com/sale?id=7", "Boots", "Coats"] {
        assert!(text.contains(needle), "{needle:?} missing from the text part:\n{text}");
    }
    assert!(!text.contains('<') && !text.contains("href"), "tags left in the text part:\n{text}");
    let html_part = message.body_html(0).expect("a text/html part");
    assert!(html_part.contains(r#"<a href="https://shop.example.com/sale?id=7">"#), "{html_part}");
}

/// A key pair made with openssl: the PEM private key file and the DNS TXT record of its public key.
struct TestKey {
    _dir: tempfile::TempDir,
    private: std::path::PathBuf,
    txt: String,
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let output = std::process::Command::new("openssl").args(args).output().expect("openssl");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

fn test_key(algorithm: &str) -> TestKey {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("dkim.pem");
    let path = private.to_str().unwrap();
    let (gen_args, k): (Vec<&str>, &str) = match algorithm {
        "rsa" => (vec!["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path], "rsa"),
        _ => (vec!["genpkey", "-algorithm", "ed25519", "-out", path], "ed25519"),
    };
    openssl(&gen_args);
    let spki = openssl(&["pkey", "-in", path, "-pubout", "-outform", "DER"]);
    // RSA records carry the SubjectPublicKeyInfo; Ed25519 records the bare 32-byte key (RFC 8463).
    let public = if k == "rsa" { spki } else { spki[spki.len() - 32..].to_vec() };
    let txt = format!("v=DKIM1; k={k}; p={}", base64::engine::general_purpose::STANDARD.encode(public));
    TestKey { _dir: dir, private, txt }
}

/// dkimpy's verdict on `message`, with the public key served from a stub instead of DNS.
fn dkimpy_verifies(message: &[u8], txt: &str, expected_name: &str) -> bool {
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

/// The `h=` tag of the DKIM-Signature: the headers it covers, lower-cased.
fn signed_headers(received: &Received) -> Vec<String> {
    let signature = received.header("DKIM-Signature").expect("a DKIM-Signature").replace(['\r', '\n', ' ', '\t'], "");
    let h = signature.split(';').find_map(|tag| tag.strip_prefix("h=")).expect("an h= tag");
    h.split(':').map(str::to_lowercase).collect()
}

async fn dkim_signature_verifies(algorithm: &str) {
    let key = test_key(algorithm);
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(
        &sink,
        &[
            ("DKIM_PRIVATE_KEY_FILE", key.private.to_str().unwrap()),
            ("DKIM_SELECTOR", "s2026"),
            ("DKIM_DOMAIN", "mailsender.test"),
            ("LIST_UNSUBSCRIBE_URL", "https://unsub.mailsender.test/unsubscribe?t={token}&l={letter_id}&k={kafka_key}"),
            ("LIST_UNSUBSCRIBE_MAILTO", "unsubscribe@mailsender.test"),
            ("UNSUBSCRIBE_SECRET", "a-test-secret-of-some-length"),
        ],
    )
    .await;
    let subject = format!("signed with {algorithm}");
    let received =
        send_one(&app, &sink, &subject, "<p>Signed body, Grüße</p><p>Second paragraph</p>", &["a@example.org"]).await;
    let signature = received.header("DKIM-Signature").unwrap();
    assert!(signature.contains(&format!("a={algorithm}-sha256")), "{signature}");
    assert!(signature.contains("d=mailsender.test") && signature.contains("s=s2026"), "{signature}");
    let covered = signed_headers(&received);
    for header in [
        "from",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "list-unsubscribe",
        "list-unsubscribe-post",
    ] {
        assert!(covered.contains(&header.to_owned()), "{header} not signed: {covered:?}");
    }
    assert!(received.header("List-Unsubscribe-Post") == Some("List-Unsubscribe=One-Click"), "{}", received.raw);

    let bytes = received.bytes();
    assert!(dkimpy_verifies(&bytes, &key.txt, "s2026._domainkey.mailsender.test"), "{}", received.raw);
    // Altered in transit: the body, or the signed unsubscribe link.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let body_altered = text.replacen("Second paragraph", "Second paragraph!", 1);
    assert_ne!(body_altered, text);
    assert!(!dkimpy_verifies(body_altered.as_bytes(), &key.txt, "s2026._domainkey.mailsender.test"));
    let link_altered = text.replacen("unsub.mailsender.test", "evil.example.com", 1);
    assert_ne!(link_altered, text);
    assert!(!dkimpy_verifies(link_altered.as_bytes(), &key.txt, "s2026._domainkey.mailsender.test"));
}

#[tokio::test]
async fn rsa_dkim_signature_verifies_and_covers_list_unsubscribe() {
    dkim_signature_verifies("rsa").await;
}

#[tokio::test]
async fn ed25519_dkim_signature_verifies_and_covers_list_unsubscribe() {
    dkim_signature_verifies("ed25519").await;
}

/// Start-up stops, naming the variable, when the key is missing or not a key; the key's text
/// never reaches the output.
#[tokio::test]
async fn a_bad_dkim_key_stops_start_up_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_key = dir.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "-----BEGIN PRIVATE KEY-----\nU0VDUkVULUtFWS1URVhU\n-----END PRIVATE KEY-----\n")
        .unwrap();
    let missing = dir.path().join("missing.pem");
    for (path, why) in [(&missing, "cannot read the key file"), (&not_a_key, "neither an RSA nor an Ed25519")] {
        // The key is read before anything is connected, so the process ends at once.
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mailsender"))
            .env_clear()
            .envs([
                ("KAFKA_BROKERS", brokers()),
                ("MONGO_LOCAL", mongo_uri()),
                ("SMTP_HOST", "127.0.0.1".to_owned()),
                ("HTTP_ADDR", format!("127.0.0.1:{}", free_port())),
                ("DKIM_SELECTOR", "s1".to_owned()),
                ("DKIM_PRIVATE_KEY_FILE", path.to_str().unwrap().to_owned()),
            ])
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(!output.status.success(), "{text}");
        assert!(text.contains("DKIM_PRIVATE_KEY_FILE=") && text.contains(why), "{text}");
        assert!(!text.contains("U0VDUkVU"), "the key's text was logged: {text}");
    }
}

const SECRET: &str = "a-test-secret-of-some-length";

/// Settings for List-Unsubscribe with the one-click endpoint on a local port; returns them and
/// the endpoint's base URL.
fn one_click_settings(app_name: &str) -> (Vec<(String, String)>, String) {
    let port = free_port();
    let settings = vec![
        (
            "LIST_UNSUBSCRIBE_URL".to_owned(),
            "https://unsub.mailsender.test/unsubscribe/{letter_id}?t={token}&k={kafka_key}".to_owned(),
        ),
        ("UNSUBSCRIBE_SECRET".to_owned(), SECRET.to_owned()),
        ("PUBLIC_HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}")),
        ("KAFKA_TOPIC_UNSUBSCRIBED".to_owned(), format!("{app_name}-unsubscribed")),
    ];
    (settings, format!("http://127.0.0.1:{port}"))
}

async fn post_one_click(url: &str, body: &str) -> u16 {
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// RFC 8058 end to end in BCC mode: the link from the received header, POSTed with the one-click
/// body, is accepted and an `unsubscribed` event (token, letter id, key; no address, since the
/// link is shared by every recipient) goes to its topic; forged or altered links get 403.
#[tokio::test]
async fn one_click_link_publishes_an_unsubscribed_event_and_forged_links_get_403() {
    let sink = SmtpSink::start().await;
    let name = unique("oc");
    let (settings, public) = one_click_settings(&name);
    let overrides: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let app = TestApp::spawn(&sink, &overrides).await;
    produce(
        &app.topic_in,
        Some("key/one"),
        &serde_json::to_vec(&json!([mailing("one click", "<p>hi</p>", &["a@example.org", "b@example.org"])])).unwrap(),
    )
    .await;
    let received = sink.wait_for_count(1, LONG).await.remove(0);
    assert_eq!(received.header("List-Unsubscribe-Post"), Some("List-Unsubscribe=One-Click"));
    let letter_id =
        received.header("Message-ID").unwrap().trim_start_matches('<').split('@').next().unwrap().to_owned();
    let link = https_link(&received);
    assert!(
        link.starts_with(&format!(
            "https://unsub.mailsender.test/unsubscribe/{letter_id}?t=token-one%20click&k=key%2Fone&sig="
        )),
        "{link}"
    );
    let local = link.replacen("https://unsub.mailsender.test", &public, 1);

    // Forged: another letter id, a changed signature, no signature; and a GET or a wrong body.
    let forged_id = local.replacen(&letter_id, "0123456789abcdef01234567", 1);
    let mut bad_sig = local.clone();
    let last = bad_sig.pop().unwrap();
    bad_sig.push(if last == 'A' { 'B' } else { 'A' });
    let unsigned = local.split("&sig=").next().unwrap().to_owned();
    for url in [&forged_id, &bad_sig, &unsigned] {
        assert_eq!(post_one_click(url, "List-Unsubscribe=One-Click").await, 403, "{url}");
    }
    assert_eq!(post_one_click(&local, "List-Unsubscribe=Other").await, 400);
    let get = reqwest::get(&local).await.unwrap().status().as_u16();
    assert_eq!(get, 405, "a GET must not unsubscribe");

    assert_eq!(post_one_click(&local, "List-Unsubscribe=One-Click").await, 200);
    let events = consume(&format!("{name}-unsubscribed"), 1, LONG).await;
    let event = events[0].json();
    assert_eq!(event["LetterID"], letter_id.as_str(), "{event}");
    assert_eq!(event["Token"], "token-one click", "{event}");
    assert_eq!(event["KafkaKey"], "key/one", "{event}");
    assert!(event.get("Address").is_none(), "a BCC link names no recipient: {event}");
    assert!(event["Time"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");
    assert_eq!(events[0].key.as_deref(), Some("key/one"));
    // Nothing suppressed in BCC mode: the link does not say who clicked.
    assert!(app.raw_documents("letters_suppressions").await.is_empty());
}

/// A 550 5.1.1 (no such mailbox) suppresses the address; a 550 5.7.1 (policy) does not. A later
/// letter skips the suppressed address, without SMTP for it, and lists it in `Suppressed`.
#[tokio::test]
async fn hard_bounces_suppress_the_address_and_later_letters_skip_it() {
    let sink = SmtpSink::start().await;
    sink.control(json!({ "rcpt_replies": {
        "gone@example.org": "550 5.1.1 no such user",
        "policy@example.org": "550 5.7.1 rejected by policy",
    }}));
    let app = TestApp::spawn(&sink, &[]).await;
    let (status, body) = app
        .post(
            "/post",
            json!([mailing("first", "<p>1</p>", &["gone@example.org", "policy@example.org", "ok@example.org"])])
                .to_string(),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    app.wait_all_final(1, LONG).await;
    let suppressed = wait_for("gone@example.org suppressed", LONG, || async {
        let documents = app.raw_documents("letters_suppressions").await;
        (!documents.is_empty()).then_some(documents)
    })
    .await;
    assert_eq!(suppressed.len(), 1, "{suppressed:?}");
    assert_eq!(suppressed[0].get_str("_id").unwrap(), "gone@example.org");
    assert_eq!(suppressed[0].get_str("reason").unwrap(), "hard_bounce");

    sink.control(json!({}));
    let before = sink.received().len();
    let (status, body) = app
        .post("/post", json!([mailing("second", "<p>2</p>", &["Gone@Example.org", "policy@example.org"])]).to_string())
        .await;
    assert_eq!(status, 202, "{body}");
    let letters = app.wait_all_final(2, LONG).await;
    let second = letters.iter().find(|l| l.subject == "second").unwrap();
    assert_eq!(second.delivered, vec!["policy@example.org"], "{second:?}");
    assert_eq!(second.rejected.len(), 1, "{second:?}");
    assert_eq!(second.rejected[0].reply, "suppressed: hard_bounce");
    let received = sink.wait_for_count(before + 1, LONG).await;
    let last = received.last().unwrap();
    assert_eq!(last.rcpt_tos, vec!["policy@example.org"], "no RCPT for the suppressed address");
    let statuses = app.consume(&app.topic_out, 2, LONG).await;
    let status = statuses.iter().map(Consumed::json).find(|s| s["Subject"] == "second").unwrap();
    assert_eq!(status["Suppressed"], json!(["Gone@Example.org"]), "{status}");
}

/// The suppression topic adds and removes entries; a malformed request goes to the dead-letter
/// topic. A letter whose every recipient is suppressed ends `error` without any SMTP.
#[tokio::test]
async fn suppression_topic_adds_removes_and_dead_letters_malformed_requests() {
    let sink = SmtpSink::start().await;
    let name = unique("sup");
    let topic = format!("{name}-suppressions");
    let app = TestApp::spawn(&sink, &[("KAFKA_TOPIC_SUPPRESSIONS", &topic)]).await;
    // Keyed by address, as producers must: an add and a later remove then stay in order.
    produce(&topic, Some("complained@example.org"), br#"{"Address":"Complained@Example.org","Reason":"complaint"}"#)
        .await;
    produce(&topic, Some("back@example.org"), br#"{"Address":"back@example.org","Reason":"bounce"}"#).await;
    produce(&topic, Some("junk"), br#"{"Address":"not an address","Reason":"x"}"#).await;
    produce(&topic, Some("back@example.org"), br#"{"Address":"back@example.org","Remove":true}"#).await;
    let dead = app.consume(&app.topic_dlq, 1, LONG).await;
    assert!(String::from_utf8_lossy(&dead[0].payload).contains("not an address"));
    assert!(dead[0].headers.get("x-error").is_some_and(|e| e.contains("Address")), "{:?}", dead[0].headers);
    assert_eq!(dead[0].headers.get("x-source-topic"), Some(&topic));
    let entries = wait_for("the removal applied", LONG, || async {
        let documents = app.raw_documents("letters_suppressions").await;
        let ids: Vec<String> = documents.iter().map(|d| d.get_str("_id").unwrap().to_owned()).collect();
        (ids == vec!["complained@example.org"]).then_some(documents)
    })
    .await;
    assert_eq!(entries[0].get_str("reason").unwrap(), "complaint");
    assert_eq!(entries[0].get_str("source").unwrap(), "kafka");

    let (status, body) = app
        .post("/post", json!([mailing("all suppressed", "<p>x</p>", &["complained@example.org"])]).to_string())
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) =
        app.post("/post", json!([mailing("removed", "<p>x</p>", &["back@example.org"])]).to_string()).await;
    assert_eq!(status, 202, "{body}");
    let letters = app.wait_all_final(2, LONG).await;
    let all = letters.iter().find(|l| l.subject == "all suppressed").unwrap();
    assert_eq!(all.status, mailsender::model::Status::Error, "{all:?}");
    assert!(all.error.as_deref().unwrap().contains("suppressed: complaint"), "{all:?}");
    let removed = letters.iter().find(|l| l.subject == "removed").unwrap();
    assert_eq!(removed.delivered, vec!["back@example.org"], "{removed:?}");
    let received = sink.received();
    assert!(received.iter().all(|m| m.header("Subject") != Some("all suppressed")), "sent to a suppressed address");
}

/// A value as the links carry it, in RFC 3986 normal form: every character but the unreserved
/// ones (letters, digits, `-._~`) percent-encoded, in upper-case hex.
fn url_encoded(value: &str) -> String {
    value
        .chars()
        .map(
            |c| {
                if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                    c.to_string()
                } else {
                    format!("%{:02X}", c as u32)
                }
            },
        )
        .collect()
}

/// `SMTP_DELIVERY=individual`: three recipients get three messages, each with its own `To:` and
/// its own unsubscribe link, and no other recipient's address anywhere in it. The one-click link
/// of one of them suppresses that address and names it in the event; a later letter skips it and
/// lists it in `Suppressed`.
#[tokio::test]
async fn individual_mode_sends_each_recipient_their_own_copy_and_link() {
    let sink = SmtpSink::start().await;
    let name = unique("ind");
    let port = free_port();
    let public = format!("http://127.0.0.1:{port}");
    let public_addr = format!("127.0.0.1:{port}");
    let unsubscribed = format!("{name}-unsubscribed");
    let app = TestApp::spawn(
        &sink,
        &[
            ("SMTP_DELIVERY", "individual"),
            ("LIST_UNSUBSCRIBE_URL", "https://unsub.mailsender.test/u/{letter_id}/{address}?t={token}"),
            ("UNSUBSCRIBE_SECRET", SECRET),
            ("PUBLIC_HTTP_ADDR", &public_addr),
            ("KAFKA_TOPIC_UNSUBSCRIBED", &unsubscribed),
        ],
    )
    .await;
    let recipients = ["ann@example.org", "Bob@Example.org", "cy@example.net"];
    let (status, body) = app.post("/post", json!([mailing("personal", "<p>Hello</p>", &recipients)]).to_string()).await;
    assert_eq!(status, 202, "{body}");
    let received = sink.wait_for_count(3, LONG).await;
    let letters = app.wait_all_final(1, LONG).await;
    assert_eq!(letters[0].delivered.len(), 3, "{:?}", letters[0]);
    let mut links = Vec::new();
    for recipient in recipients {
        let copy = received
            .iter()
            .find(|m| m.rcpt_tos.len() == 1 && m.rcpt_tos[0].eq_ignore_ascii_case(recipient))
            .expect("a copy per recipient");
        assert_eq!(copy.header("To"), Some(recipient), "{}", copy.raw);
        let link = https_link(copy);
        let encoded = url_encoded(recipient);
        assert!(link.contains(&format!("/{encoded}?")), "{link}");
        let raw = copy.raw.to_lowercase();
        for other in recipients.iter().filter(|o| **o != recipient) {
            let other = other.to_lowercase();
            assert!(
                !raw.contains(&other) && !raw.contains(&other.replace('@', "%40")),
                "{other} in {recipient}'s copy"
            );
        }
        links.push(link);
    }
    assert_eq!(links.iter().collect::<std::collections::HashSet<_>>().len(), 3);

    // Bob's link, altered to name Ann, is refused; Bob's own link suppresses Bob.
    let bob = links[1].replacen("https://unsub.mailsender.test", &public, 1);
    let altered = bob.replace(&url_encoded("Bob@Example.org"), &url_encoded("ann@example.org"));
    assert_ne!(altered, bob);
    assert_eq!(post_one_click(&altered, "List-Unsubscribe=One-Click").await, 403);
    assert_eq!(post_one_click(&bob, "List-Unsubscribe=One-Click").await, 200);
    let event = consume(&unsubscribed, 1, LONG).await[0].json();
    assert_eq!(event["Address"], "Bob@Example.org", "{event}");
    let entries = app.raw_documents("letters_suppressions").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].get_str("_id").unwrap(), "bob@example.org");
    assert_eq!(entries[0].get_str("reason").unwrap(), "unsubscribe");

    let (status, body) =
        app.post("/post", json!([mailing("after unsubscribe", "<p>Again</p>", &recipients)]).to_string()).await;
    assert_eq!(status, 202, "{body}");
    let letters = app.wait_all_final(2, LONG).await;
    let second = letters.iter().find(|l| l.subject == "after unsubscribe").unwrap();
    assert_eq!(second.delivered.len(), 2, "{second:?}");
    let statuses = app.consume(&app.topic_out, 2, LONG).await;
    let status = statuses.iter().map(Consumed::json).find(|s| s["Subject"] == "after unsubscribe").unwrap();
    assert_eq!(status["Suppressed"], json!(["Bob@Example.org"]), "{status}");
    assert_eq!(sink.received().len(), 5, "no copy for the unsubscribed recipient");
}
