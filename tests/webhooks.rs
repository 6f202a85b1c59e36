//! The relays' webhooks (issue 20) end to end, against the real binary: a letter sent through the
//! test relay, then each relay's webhook POSTed to the public listener as the relay signs it;
//! the event on the feedback topic, the suppression list and `GET /letters/{id}`. A forged
//! request changes nothing, a replayed one makes no second event, an unknown letter is answered
//! 200 and counted.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use hmac::Mac as _;
use mongodb::bson::oid::ObjectId;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);
const MAILGUN_KEY: &str = "key-mailgun-signing-0123456789abcdef";
const POSTMARK_USER: &str = "postmark-hooks";
const POSTMARK_PASSWORD: &str = "postmark-password-0123456789";
const SNS_TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:ses-feedback";
const SNS_CERT_URL: &str = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem";
/// The SendGrid test key pair's private half (any scalar below the curve order will do).
const SENDGRID_SECRET: [u8; 32] = [7; 32];

struct Hooks {
    app: TestApp,
    sink: SmtpSink,
    public: String,
    topic: String,
}

fn sendgrid_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&SENDGRID_SECRET).unwrap()
}

async fn start() -> Hooks {
    use p256::pkcs8::EncodePublicKey as _;
    let sink = SmtpSink::start().await;
    let port = free_port();
    let topic = unique("webhooks-");
    let public_key = base64::engine::general_purpose::STANDARD
        .encode(p256::PublicKey::from(sendgrid_key().verifying_key()).to_public_key_der().unwrap().as_bytes());
    let app = TestApp::spawn(
        &sink,
        &[
            ("PUBLIC_HTTP_ADDR", &format!("127.0.0.1:{port}")),
            // The one-click endpoint shares the listener; its catch-all must leave the webhooks be.
            ("LIST_UNSUBSCRIBE_URL", "https://unsub.mailsender.test/unsubscribe/{letter_id}?t={token}"),
            ("UNSUBSCRIBE_SECRET", "unsubscribe-secret-0123456789"),
            ("MAILGUN_WEBHOOK_SIGNING_KEY", MAILGUN_KEY),
            ("SENDGRID_WEBHOOK_PUBLIC_KEY", &public_key),
            ("POSTMARK_WEBHOOK_USER", POSTMARK_USER),
            ("POSTMARK_WEBHOOK_PASSWORD", POSTMARK_PASSWORD),
            ("SNS_TOPIC_ARNS", SNS_TOPIC),
            ("SNS_SIGNING_CERT_FILE", &repo_root().join("tests/fixtures/sns/test-signing-cert.pem").to_string_lossy()),
            ("KAFKA_TOPIC_FEEDBACK", &topic),
        ],
    )
    .await;
    Hooks { app, sink, public: format!("http://127.0.0.1:{port}"), topic }
}

/// Sends one letter; returns its id and the message the relay received.
async fn send_letter(h: &Hooks, key: &str, token: &str, addresses: &[&str]) -> (ObjectId, Received) {
    let before = h.sink.received().len();
    let batch = json!([{ "Subject": "News", "Body": "<p>Hello</p>", "Addresses": addresses, "Token": token }]);
    h.app.produce(Some(key), batch.to_string().as_bytes()).await;
    let letters = h
        .app
        .wait_for_letters("the letter sent", LONG, |letters| {
            letters.iter().any(|l| l.token == token && l.status == mailsender::model::Status::Sent)
        })
        .await;
    let letter = letters.into_iter().find(|l| l.token == token).unwrap();
    let received = h.sink.wait_for_count(before + 1, LONG).await;
    let message = received.into_iter().find(|r| r.raw.contains(&letter.id.to_hex())).expect("the letter's message");
    (letter.id, message)
}

async fn post(url: &str, body: &str, headers: &[(&str, String)], basic: Option<(&str, &str)>) -> (u16, String) {
    let mut request = reqwest::Client::new().post(url).header("content-type", "application/json").body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    if let Some((user, password)) = basic {
        request = request.basic_auth(user, Some(password));
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn feedback_of(app: &TestApp, id: ObjectId, address: &str) -> Value {
    let (status, body) = app.get(&format!("/letters/{}", id.to_hex())).await;
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap();
    view["recipients"].as_array().unwrap().iter().find(|r| r["address"] == address).unwrap()["feedback"].clone()
}

/// What every relay's test checks once its valid bounce and complaint are in: two events on the
/// topic (the replay and the forgeries made none), both addresses suppressed, the notes on the
/// letter, one record per event.
async fn check_two_events(h: &Hooks, id: ObjectId, source: &str, token: &str) {
    let events = consume(&h.topic, 2, LONG).await;
    let seen: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let e = e.json();
            (
                e["Event"].as_str().unwrap().to_owned(),
                e["Address"].as_str().unwrap().to_owned(),
                e["Source"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("hard_bounce".to_owned(), "dead@hard.example".to_owned(), source.to_owned()),
            ("complaint".to_owned(), "angry@example.com".to_owned(), source.to_owned()),
        ]
    );
    let first = events[0].json();
    assert_eq!(first["LetterID"], id.to_hex());
    assert_eq!(first["Token"], token);
    assert_eq!(first["Status"], "5.1.1");
    assert!(events.iter().all(|e| e.key.is_some()), "keyed by the letter's Kafka key");
    assert_eq!(
        suppressed(&h.app.raw_documents("letters_suppressions").await),
        [
            ("angry@example.com".to_owned(), "complaint".to_owned()),
            ("dead@hard.example".to_owned(), "hard_bounce".to_owned()),
        ]
    );
    let dead = feedback_of(&h.app, id, "dead@hard.example").await;
    assert_eq!(dead.as_array().map(Vec::len), Some(1), "{dead}");
    assert_eq!((dead[0]["event"].as_str(), dead[0]["source"].as_str()), (Some("hard_bounce"), Some(source)));
    assert!(feedback_of(&h.app, id, "fine@ok.example").await.is_null());
    assert_eq!(h.app.raw_documents("letters_feedback").await.len(), 2, "one record per event");
}

/// Nothing recorded, nothing suppressed, nothing published (checked again later by the topic's
/// first event being the valid one).
async fn check_nothing_yet(h: &Hooks) {
    assert!(h.app.raw_documents("letters_feedback").await.is_empty());
    assert!(h.app.raw_documents("letters_suppressions").await.is_empty());
}

fn mailgun_body(timestamp: i64, token: &str, data: Value) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(MAILGUN_KEY.as_bytes()).unwrap();
    mac.update(format!("{timestamp}{token}").as_bytes());
    let signature: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    json!({ "signature": { "timestamp": timestamp.to_string(), "token": token, "signature": signature }, "event-data": data })
        .to_string()
}

fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn mailgun_events_are_recorded_once_and_forgeries_refused() {
    let h = start().await;
    let url = format!("{}/webhooks/mailgun", h.public);
    let addresses = ["dead@hard.example", "angry@example.com", "fine@ok.example"];
    let (id, message) = send_letter(&h, "key-mg", "token-mg", &addresses).await;
    assert_eq!(message.header("X-Mailgun-Variables"), Some(format!(r#"{{"letter_id":"{}"}}"#, id.to_hex()).as_str()));
    // As Mailgun reports it: our Message-ID, without its brackets.
    let message_id = message.header("Message-ID").unwrap().trim_matches(['<', '>']).to_owned();
    let bounce = json!({
        "event": "failed", "severity": "permanent", "reason": "bounce", "recipient": "dead@hard.example",
        "delivery-status": { "code": 550, "message": "5.1.1 The email account that you tried to reach does not exist", "description": "" },
        "message": { "headers": { "message-id": message_id } },
    });
    let valid = mailgun_body(now_s(), "token-one-0123456789012345678901234567890123456789", bounce.clone());

    // Forged: a signature that is not the key's; then a signed request an hour old (a captured
    // one), and a body that is not JSON.
    let mut forged: Value = serde_json::from_str(&valid).unwrap();
    forged["signature"]["signature"] = json!("00".repeat(32));
    assert_eq!(post(&url, &forged.to_string(), &[], None).await.0, 403);
    let stale = mailgun_body(now_s() - 3600, "token-stale-012345678901234567890123456789012345678", bounce.clone());
    assert_eq!(post(&url, &stale, &[], None).await.0, 403);
    assert_eq!(post(&url, "not json", &[], None).await.0, 400);
    check_nothing_yet(&h).await;

    let (status, text) = post(&url, &valid, &[], None).await;
    assert_eq!(status, 200, "{text}");
    // Mailgun's retry of the same request: 200, nothing new.
    assert_eq!(post(&url, &valid, &[], None).await.0, 200);
    // Its token and signature on another body: refused.
    let mut swapped: Value = serde_json::from_str(&valid).unwrap();
    swapped["event-data"]["recipient"] = json!("fine@ok.example");
    assert_eq!(post(&url, &swapped.to_string(), &[], None).await.0, 403);
    // The same bounce again under a fresh token (a second report of it): one event still.
    let again = mailgun_body(now_s(), "token-two-0123456789012345678901234567890123456789", bounce);
    assert_eq!(post(&url, &again, &[], None).await.0, 200);
    let complaint = json!({ "event": "complained", "recipient": "angry@example.com", "user-variables": { "letter_id": id.to_hex() } });
    let complaint = mailgun_body(now_s(), "token-three-01234567890123456789012345678901234567", complaint);
    assert_eq!(post(&url, &complaint, &[], None).await.0, 200);
    check_two_events(&h, id, "mailgun", "token-mg").await;

    // A letter this deployment does not have: 200, ignored and counted.
    let unknown = json!({ "event": "complained", "recipient": "x@example.com", "user-variables": { "letter_id": ObjectId::new().to_hex() } });
    let unknown = mailgun_body(now_s(), "token-four-0123456789012345678901234567890123456789", unknown);
    assert_eq!(post(&url, &unknown, &[], None).await.0, 200);
    let metrics = h.app.get("/metrics").await.1;
    assert_eq!(
        metric_value(&metrics, r#"mailsender_feedback_webhook_ignored_total{relay="mailgun",reason="unknown_letter"}"#),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, r#"mailsender_feedback_webhook_refused_total{relay="mailgun",reason="forged"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, r#"mailsender_feedback_events_total{kind="hard_bounce",source="mailgun"}"#),
        Some(1.0)
    );
    // The one-click endpoint still answers beside the webhooks.
    let one_click = format!("{}/unsubscribe/{}?t=x", h.public, id.to_hex());
    assert_eq!(post(&one_click, "List-Unsubscribe=One-Click", &[], None).await.0, 403, "a forged one-click link");
}

fn sendgrid_headers(body: &str, timestamp: &str) -> Vec<(&'static str, String)> {
    use p256::ecdsa::{Signature, signature::Signer as _};
    let signature: Signature = sendgrid_key().sign(format!("{timestamp}{body}").as_bytes());
    vec![
        (
            "X-Twilio-Email-Event-Webhook-Signature",
            base64::engine::general_purpose::STANDARD.encode(signature.to_der()),
        ),
        ("X-Twilio-Email-Event-Webhook-Timestamp", timestamp.to_owned()),
    ]
}

#[tokio::test]
async fn sendgrid_events_are_recorded_once_and_forgeries_refused() {
    let h = start().await;
    let url = format!("{}/webhooks/sendgrid", h.public);
    let addresses = ["dead@hard.example", "angry@example.com", "fine@ok.example"];
    let (id, message) = send_letter(&h, "key-sg", "token-sg", &addresses).await;
    assert_eq!(
        message.header("X-SMTPAPI"),
        Some(format!(r#"{{"unique_args":{{"letter_id":"{}"}}}}"#, id.to_hex()).as_str())
    );
    // As SendGrid reports them: the bounce with our Message-ID in `smtp-id`, the spam report
    // (which has no `smtp-id`) with the unique args at the top level.
    let bounce = json!([{
        "email": "dead@hard.example", "event": "bounce", "type": "bounce", "status": "5.1.1",
        "reason": "550 5.1.1 The email account that you tried to reach does not exist", "timestamp": now_s(),
        "smtp-id": message.header("Message-ID").unwrap(), "sg_event_id": "ZHJvcC0x", "sg_message_id": "LRzXl.filter-1",
    }, {
        "email": "fine@ok.example", "event": "delivered", "timestamp": now_s(), "letter_id": id.to_hex(),
    }])
    .to_string();
    let timestamp = now_s().to_string();
    let headers = sendgrid_headers(&bounce, &timestamp);

    // Forged: signed by another key, a body altered after signing, no signature at all.
    let other = p256::ecdsa::SigningKey::from_slice(&[9; 32]).unwrap();
    let forged_signature: p256::ecdsa::Signature =
        p256::ecdsa::signature::Signer::sign(&other, format!("{timestamp}{bounce}").as_bytes());
    let forged = vec![
        (
            "X-Twilio-Email-Event-Webhook-Signature",
            base64::engine::general_purpose::STANDARD.encode(forged_signature.to_der()),
        ),
        ("X-Twilio-Email-Event-Webhook-Timestamp", timestamp.clone()),
    ];
    assert_eq!(post(&url, &bounce, &forged, None).await.0, 403);
    assert_eq!(post(&url, &bounce.replace("dead@", "fine@"), &headers, None).await.0, 403);
    assert_eq!(post(&url, &bounce, &[], None).await.0, 403);
    check_nothing_yet(&h).await;

    let (status, text) = post(&url, &bounce, &headers, None).await;
    assert_eq!(status, 200, "{text}");
    // SendGrid's retry: the same request again.
    assert_eq!(post(&url, &bounce, &headers, None).await.0, 200);
    let complaint = json!([{ "email": "angry@example.com", "event": "spamreport", "timestamp": now_s(), "letter_id": id.to_hex() }])
        .to_string();
    assert_eq!(post(&url, &complaint, &sendgrid_headers(&complaint, &timestamp), None).await.0, 200);
    check_two_events(&h, id, "sendgrid", "token-sg").await;

    // With SendGrid's batching: events it does not report on (opens) fill the batch past the
    // one-click endpoint's 4 KiB body limit, which is not the webhooks'.
    let mut batch = vec![
        json!({ "email": "x@example.com", "event": "spamreport", "letter_id": ObjectId::new().to_hex() }),
        json!({ "email": "y@example.com", "event": "spamreport" }),
    ];
    batch.extend(
        (0..200)
            .map(|i| json!({ "email": format!("reader{i}@example.com"), "event": "open", "letter_id": id.to_hex() })),
    );
    let unknown = Value::Array(batch).to_string();
    assert!(unknown.len() > 8192);
    assert_eq!(post(&url, &unknown, &sendgrid_headers(&unknown, &timestamp), None).await.0, 200);
    let metrics = h.app.get("/metrics").await.1;
    assert_eq!(
        metric_value(
            &metrics,
            r#"mailsender_feedback_webhook_ignored_total{relay="sendgrid",reason="unknown_letter"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, r#"mailsender_feedback_webhook_ignored_total{relay="sendgrid",reason="no_letter"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, r#"mailsender_feedback_webhook_refused_total{relay="sendgrid",reason="forged"}"#),
        Some(3.0)
    );
}

#[tokio::test]
async fn postmark_events_are_recorded_once_and_wrong_credentials_refused() {
    let h = start().await;
    let url = format!("{}/webhooks/postmark", h.public);
    let addresses = ["dead@hard.example", "angry@example.com", "fine@ok.example"];
    let (id, message) = send_letter(&h, "key-pm", "token-pm", &addresses).await;
    let letter_id = message.header("X-PM-Metadata-letter_id").expect("Postmark's metadata header").to_owned();
    assert_eq!(letter_id, id.to_hex());
    // Postmark's bounce webhook sample, for our letter.
    let bounce = json!({
        "RecordType": "Bounce", "MessageStream": "outbound", "ID": 4323372036854775807_u64, "Type": "HardBounce",
        "TypeCode": 1, "Name": "Hard bounce", "Tag": "", "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
        "Metadata": { "letter_id": letter_id }, "ServerID": 23,
        "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist",
        "Email": "dead@hard.example", "From": "noreply@mailsender.test", "BouncedAt": "2019-11-05T16:33:54.9070259Z",
        "DumpAvailable": true, "Inactive": true, "CanActivate": true, "Subject": "News"
    })
    .to_string();

    let (status, _) = post(&url, &bounce, &[], None).await;
    assert_eq!(status, 401, "no credentials");
    assert_eq!(post(&url, &bounce, &[], Some((POSTMARK_USER, "wrong-password-0123456789"))).await.0, 401);
    assert_eq!(post(&url, &bounce, &[], Some(("someone", POSTMARK_PASSWORD))).await.0, 401);
    check_nothing_yet(&h).await;

    let auth = Some((POSTMARK_USER, POSTMARK_PASSWORD));
    let (status, text) = post(&url, &bounce, &[], auth).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(post(&url, &bounce, &[], auth).await.0, 200, "Postmark's retry");
    let complaint = json!({ "RecordType": "SpamComplaint", "Type": "SpamComplaint", "Email": "angry@example.com",
        "Metadata": { "letter_id": letter_id }, "MessageID": "00000000-0000-0000-0000-000000000000" })
    .to_string();
    assert_eq!(post(&url, &complaint, &[], auth).await.0, 200);
    check_two_events(&h, id, "postmark", "token-pm").await;

    let unknown = json!({ "RecordType": "SpamComplaint", "Email": "x@example.com", "Metadata": { "letter_id": ObjectId::new().to_hex() } })
        .to_string();
    assert_eq!(post(&url, &unknown, &[], auth).await.0, 200);
    let metrics = h.app.get("/metrics").await.1;
    assert_eq!(
        metric_value(
            &metrics,
            r#"mailsender_feedback_webhook_ignored_total{relay="postmark",reason="unknown_letter"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"mailsender_feedback_webhook_refused_total{relay="postmark",reason="unauthenticated"}"#
        ),
        Some(3.0)
    );
}

/// An SNS message signed with the test certificate's key (SignatureVersion 2, SHA-256), as SNS
/// sends it now.
fn sns_message(kind: &str, fields: Value) -> Value {
    sns_message_at(kind, fields, std::time::SystemTime::now())
}

/// An SNS message published (and signed) at `published`.
fn sns_message_at(kind: &str, fields: Value, published: std::time::SystemTime) -> Value {
    use rsa::{pkcs8::DecodePrivateKey as _, signature::SignatureEncoding as _, signature::Signer as _};
    let timestamp = humantime::format_rfc3339_millis(published).to_string();
    let mut message = json!({
        "Type": kind, "MessageId": ObjectId::new().to_hex(), "TopicArn": SNS_TOPIC,
        "Timestamp": timestamp, "SignatureVersion": "2", "SigningCertURL": SNS_CERT_URL,
    });
    for (name, value) in fields.as_object().unwrap() {
        message[name] = value.clone();
    }
    let text: String = match kind {
        "Notification" => ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"].as_slice(),
        _ => ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"].as_slice(),
    }
    .iter()
    .filter_map(|name| message[*name].as_str().map(|value| format!("{name}\n{value}\n")))
    .collect();
    let pem = std::fs::read_to_string(repo_root().join("tests/fixtures/sns/test-signing-key.pem")).unwrap();
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(&pem).unwrap();
    let signature = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key).sign(text.as_bytes()).to_vec();
    message["Signature"] = json!(base64::engine::general_purpose::STANDARD.encode(signature));
    message
}

fn ses_notification(notification: Value) -> Value {
    sns_message("Notification", json!({ "Message": notification.to_string() }))
}

#[tokio::test]
async fn ses_notifications_through_sns_are_recorded_once_and_forgeries_refused() {
    let h = start().await;
    let url = format!("{}/webhooks/ses", h.public);
    let addresses = ["dead@hard.example", "angry@example.com", "fine@ok.example"];
    let (id, message) = send_letter(&h, "key-ses", "token-ses", &addresses).await;
    let mail = json!({ "messageId": "0000014a-ses-id", "source": "noreply@mailsender.test",
        "commonHeaders": { "messageId": message.header("Message-ID").unwrap() } });
    let bounce = ses_notification(json!({
        "notificationType": "Bounce",
        "bounce": { "bounceType": "Permanent", "bounceSubType": "General", "bouncedRecipients": [
            { "emailAddress": "dead@hard.example", "status": "5.1.1", "action": "failed", "diagnosticCode": "smtp; 550 5.1.1 user unknown" } ] },
        "mail": mail,
    }));

    // Forged: the message altered after signing, another topic, a certificate from elsewhere.
    let mut altered = bounce.clone();
    altered["Message"] = json!(bounce["Message"].as_str().unwrap().replace("dead@hard.example", "fine@ok.example"));
    assert_eq!(post(&url, &altered.to_string(), &[], None).await.0, 403);
    let mut other_topic = bounce.clone();
    other_topic["TopicArn"] = json!("arn:aws:sns:us-east-1:999999999999:someone-else");
    assert_eq!(post(&url, &other_topic.to_string(), &[], None).await.0, 403);
    let mut elsewhere = bounce.clone();
    elsewhere["SigningCertURL"] = json!("https://sns.us-east-1.amazonaws.com.evil.example/cert.pem");
    assert_eq!(post(&url, &elsewhere.to_string(), &[], None).await.0, 403);
    // A subscription confirmation whose SubscribeURL is not Amazon's: refused, never fetched.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let subscribe = sns_message(
        "SubscriptionConfirmation",
        json!({ "Message": "You have chosen to subscribe", "Token": "2336412f37",
            "SubscribeURL": format!("https://127.0.0.1:{}/?Action=ConfirmSubscription", trap.local_addr().unwrap().port()) }),
    );
    assert_eq!(post(&url, &subscribe.to_string(), &[], None).await.0, 403);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), trap.accept()).await.is_err(),
        "the SubscribeURL was not fetched"
    );
    check_nothing_yet(&h).await;

    let (status, text) = post(&url, &bounce.to_string(), &[], None).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(post(&url, &bounce.to_string(), &[], None).await.0, 200, "SNS's retry");
    let complaint = ses_notification(json!({
        "notificationType": "Complaint",
        "complaint": { "complainedRecipients": [{ "emailAddress": "angry@example.com" }], "complaintFeedbackType": "abuse" },
        "mail": mail,
    }));
    assert_eq!(post(&url, &complaint.to_string(), &[], None).await.0, 200);
    check_two_events(&h, id, "ses", "token-ses").await;

    let unknown = ses_notification(json!({
        "notificationType": "Complaint",
        "complaint": { "complainedRecipients": [{ "emailAddress": "x@example.com" }] },
        "mail": { "commonHeaders": { "messageId": format!("<{}@mailsender.test>", ObjectId::new().to_hex()) } },
    }));
    assert_eq!(post(&url, &unknown.to_string(), &[], None).await.0, 200);
    let metrics = h.app.get("/metrics").await.1;
    assert_eq!(
        metric_value(&metrics, r#"mailsender_feedback_webhook_ignored_total{relay="ses",reason="unknown_letter"}"#),
        Some(1.0),
        "{metrics}"
    );
    for (reason, count) in [("forged", 1.0), ("topic", 1.0), ("url", 2.0)] {
        assert_eq!(
            metric_value(
                &metrics,
                &format!(r#"mailsender_feedback_webhook_refused_total{{relay="ses",reason="{reason}"}}"#)
            ),
            Some(count),
            "{reason}"
        );
    }
}

// Replays by time: a signature binds its timestamp; past the bound the request is refused (403)
// and changes nothing, however well signed. Each test failed before the bound existed (SendGrid,
// SNS) or while Mailgun's was 15 minutes.

/// What every replay test checks after its stale requests: refused as stale, nothing recorded,
/// and the same event signed now is taken (so it was the time that was refused).
async fn check_stale_refused_then_fresh_taken(h: &Hooks, relay: &str, stale: usize, fresh: (u16, String)) {
    let metrics = h.app.get("/metrics").await.1;
    assert_eq!(
        metric_value(
            &metrics,
            &format!(r#"mailsender_feedback_webhook_refused_total{{relay="{relay}",reason="stale"}}"#)
        ),
        Some(stale as f64),
        "{metrics}"
    );
    assert_eq!(fresh.0, 200, "{}", fresh.1);
    let events = consume(&h.topic, 1, LONG).await;
    assert_eq!(events[0].json()["Event"], "hard_bounce");
    assert_eq!(h.app.raw_documents("letters_feedback").await.len(), 1);
}

#[tokio::test]
async fn a_mailgun_signature_older_than_five_minutes_is_refused() {
    let h = start().await;
    let url = format!("{}/webhooks/mailgun", h.public);
    let (id, _) = send_letter(&h, "key-mg-old", "token-mg-old", &["dead@hard.example"]).await;
    let bounce = json!({
        "event": "failed", "severity": "permanent", "reason": "bounce", "recipient": "dead@hard.example",
        "delivery-status": { "message": "5.1.1 The email account that you tried to reach does not exist" },
        "user-variables": { "letter_id": id.to_hex() },
    });
    // Captured ten minutes ago, and signed by a clock ten minutes fast.
    let old = mailgun_body(now_s() - 600, "token-old-0123456789012345678901234567890123456789", bounce.clone());
    assert_eq!(post(&url, &old, &[], None).await.0, 403);
    let ahead = mailgun_body(now_s() + 600, "token-ahead-01234567890123456789012345678901234567", bounce.clone());
    assert_eq!(post(&url, &ahead, &[], None).await.0, 403);
    check_nothing_yet(&h).await;
    let fresh = mailgun_body(now_s(), "token-fresh-01234567890123456789012345678901234567", bounce);
    check_stale_refused_then_fresh_taken(&h, "mailgun", 2, post(&url, &fresh, &[], None).await).await;
}

#[tokio::test]
async fn a_sendgrid_signature_older_than_five_minutes_is_refused() {
    let h = start().await;
    let url = format!("{}/webhooks/sendgrid", h.public);
    let (id, _) = send_letter(&h, "key-sg-old", "token-sg-old", &["dead@hard.example"]).await;
    let bounce = json!([{
        "email": "dead@hard.example", "event": "bounce", "type": "bounce", "status": "5.1.1",
        "reason": "550 5.1.1 The email account that you tried to reach does not exist", "letter_id": id.to_hex(),
    }])
    .to_string();
    let old = (now_s() - 600).to_string();
    assert_eq!(post(&url, &bounce, &sendgrid_headers(&bounce, &old), None).await.0, 403);
    let ahead = (now_s() + 600).to_string();
    assert_eq!(post(&url, &bounce, &sendgrid_headers(&bounce, &ahead), None).await.0, 403);
    assert_eq!(post(&url, &bounce, &sendgrid_headers(&bounce, "not a time"), None).await.0, 403);
    check_nothing_yet(&h).await;
    let fresh = post(&url, &bounce, &sendgrid_headers(&bounce, &now_s().to_string()), None).await;
    check_stale_refused_then_fresh_taken(&h, "sendgrid", 3, fresh).await;
}

#[tokio::test]
async fn an_sns_message_older_than_an_hour_is_refused() {
    let h = start().await;
    let url = format!("{}/webhooks/ses", h.public);
    let (_, message) = send_letter(&h, "key-ses-old", "token-ses-old", &["dead@hard.example"]).await;
    let notification = json!({ "Message": json!({
        "notificationType": "Bounce",
        "bounce": { "bounceType": "Permanent", "bouncedRecipients": [{ "emailAddress": "dead@hard.example", "status": "5.1.1" }] },
        "mail": { "commonHeaders": { "messageId": message.header("Message-ID").unwrap() } },
    }).to_string() });
    let now = std::time::SystemTime::now();
    let old = sns_message_at("Notification", notification.clone(), now - Duration::from_secs(2 * 3600));
    assert_eq!(post(&url, &old.to_string(), &[], None).await.0, 403);
    let ahead = sns_message_at("Notification", notification.clone(), now + Duration::from_secs(600));
    assert_eq!(post(&url, &ahead.to_string(), &[], None).await.0, 403);
    check_nothing_yet(&h).await;
    // SNS's retry of a message published half an hour ago (our listener was down): taken.
    let retried = sns_message_at("Notification", notification, now - Duration::from_secs(1800));
    check_stale_refused_then_fresh_taken(&h, "ses", 2, post(&url, &retried.to_string(), &[], None).await).await;
}
