//! The feedback loop (issue 20) end to end, against the real binary: letters sent through the test
//! relay with a signed return path, then DSNs (made by a real Postfix, tests/fixtures/feedback/)
//! and an ARF report delivered by SMTP to the feedback listener, then the events on the feedback
//! topic, the suppression list and `GET /letters/{id}`; and what bad input gets.

mod common;
#[path = "common/inbound.rs"]
mod inbound;

use std::time::Duration;

use tokio::io::{AsyncWriteExt as _, BufReader};

use common::*;
use inbound::*;
use mailsender::{feedback::return_path::ReturnPath, model::Status};
use mongodb::bson::oid::ObjectId;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);
const SECRET: &str = "feedback-test-secret-0123456789";
const BOUNCE_DOMAIN: &str = "bounce.mailsender.test";
const LOOP_ADDRESS: &str = "fbl@bounce.mailsender.test";

struct Feedback {
    app: TestApp,
    port: u16,
    topic: String,
}

/// Sends one letter and returns its id and the MAIL FROM the relay saw.
async fn send_letter(f: &Feedback, sink: &SmtpSink, key: &str, token: &str, addresses: &[&str]) -> (ObjectId, String) {
    let before = sink.received().len();
    // The mailing's Metadata comes back in every feedback event (issue 19).
    let batch = json!([{
        "Subject": "Monthly news", "Body": "<p>Hello</p>", "Addresses": addresses, "Token": token,
        "Metadata": { "producer_ref": format!("ref-{token}") },
    }]);
    f.app.produce(Some(key), batch.to_string().as_bytes()).await;
    let letters = f
        .app
        .wait_for_letters("the letter sent", LONG, |letters| {
            letters.iter().any(|l| l.token == token && l.status == Status::Sent)
        })
        .await;
    let letter = letters.into_iter().find(|l| l.token == token).unwrap();
    let received = sink.wait_for_count(before + 1, LONG).await;
    let message = received.iter().find(|r| r.raw.contains(&letter.id.to_hex())).expect("the letter's message");
    (letter.id, message.mail_from.clone())
}

async fn letter_view(app: &TestApp, id: ObjectId) -> Value {
    let (status, body) = app.get(&format!("/letters/{}", id.to_hex())).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn recipient<'a>(view: &'a Value, address: &str) -> &'a Value {
    view["recipients"].as_array().unwrap().iter().find(|r| r["address"] == address).unwrap()
}

async fn metrics(app: &TestApp) -> String {
    app.get("/metrics").await.1
}

#[tokio::test]
async fn a_postfix_bounce_reaches_the_topic_the_suppression_list_and_the_letter() {
    let sink = SmtpSink::start().await;
    let f = start_with(&sink).await;
    let addresses = ["nobody@hard.example", "later@slow.example", "fine@ok.example"];
    let (id, mail_from) = send_letter(&f, &sink, "key-bounce", "token-bounce", &addresses).await;

    // The envelope sender is the letter's signed return path; the From header is unchanged.
    assert!(mail_from.starts_with(&format!("bounces+{}.", id.to_hex())), "{mail_from}");
    assert!(mail_from.ends_with(&format!("@{BOUNCE_DOMAIN}")), "{mail_from}");
    let received = sink.received();
    let message = received.iter().find(|r| r.mail_from == mail_from).unwrap();
    assert_eq!(message.header("From"), Some("\"Mailsender Test\" <noreply@mailsender.test>"));

    // Postfix's DSN for the dead address, delivered to that return path.
    let (rcpt, end) = deliver(f.port, &mail_from, &fixture("dsn-postfix-hard.eml")).await;
    assert!(rcpt.starts_with("250"), "{rcpt}");
    assert!(end.starts_with("250"), "{end}");
    let events = consume(&f.topic, 1, LONG).await;
    assert_eq!(events[0].key.as_deref(), Some("key-bounce"), "keyed by the letter's Kafka key");
    let event = events[0].json();
    assert_eq!(event["Event"], "hard_bounce");
    assert_eq!(event["LetterID"], id.to_hex());
    assert_eq!(event["Token"], "token-bounce");
    assert_eq!(event["Metadata"], json!({ "producer_ref": "ref-token-bounce" }));
    assert_eq!(event["KafkaKey"], "key-bounce");
    assert_eq!(event["Address"], "nobody@hard.example");
    assert_eq!(event["Status"], "5.1.1");
    assert_eq!(event["Source"], "dsn");
    assert!(event["Diagnostic"].as_str().unwrap().starts_with("550 5.1.1 <nobody@hard.example>"), "{event}");
    assert_eq!(
        suppressed(&f.app.raw_documents("letters_suppressions").await),
        [("nobody@hard.example".to_owned(), "hard_bounce".to_owned())]
    );
    let view = letter_view(&f.app, id).await;
    let nobody = recipient(&view, "nobody@hard.example");
    assert_eq!(nobody["outcome"], "delivered", "the relay took it");
    assert_eq!(nobody["feedback"][0]["event"], "hard_bounce");
    assert_eq!(nobody["feedback"][0]["status"], "5.1.1");
    assert!(recipient(&view, "fine@ok.example").get("feedback").is_none());

    // The same DSN again (an MTA that lost our 250): one event, counted as a duplicate.
    let (_, end) = deliver(f.port, &mail_from, &fixture("dsn-postfix-hard.eml")).await;
    assert!(end.starts_with("250"), "{end}");
    // Then the delay warning and the final soft bounce for the full mailbox: neither suppresses.
    let (_, end) = deliver(f.port, &mail_from, &fixture("dsn-postfix-delay.eml")).await;
    assert!(end.starts_with("250"), "{end}");
    let (_, end) = deliver(f.port, &mail_from, &fixture("dsn-postfix-soft.eml")).await;
    assert!(end.starts_with("250"), "{end}");
    let events = consume(&f.topic, 3, LONG).await;
    let kinds: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.json()["Event"].as_str().unwrap().to_owned(), e.json()["Address"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("hard_bounce".to_owned(), "nobody@hard.example".to_owned()),
            ("delay".to_owned(), "later@slow.example".to_owned()),
            ("soft_bounce".to_owned(), "later@slow.example".to_owned()),
        ],
        "the repeated hard bounce published nothing"
    );
    assert_eq!(f.app.raw_documents("letters_suppressions").await.len(), 1, "soft bounces and delays do not suppress");
    let text = metrics(&f.app).await;
    assert_eq!(metric_value(&text, "mailsender_feedback_duplicates_total"), Some(1.0), "{text}");
    assert_eq!(metric_value(&text, r#"mailsender_feedback_events_total{kind="hard_bounce",source="dsn"}"#), Some(1.0));
    let recorded = f.app.raw_documents("letters_feedback").await;
    let mut kinds: Vec<&str> = recorded.iter().map(|d| d.get_str("kind").unwrap()).collect();
    kinds.sort();
    assert_eq!(kinds, ["delay", "hard_bounce", "soft_bounce"], "one record per event");
    assert!(recorded.iter().all(|d| d.get_i32("published") == Ok(1) && d.get_object_id("letter_id") == Ok(id)));
    let view = letter_view(&f.app, id).await;
    assert_eq!(recipient(&view, "nobody@hard.example")["feedback"].as_array().unwrap().len(), 1);
    let later: Vec<&str> = recipient(&view, "later@slow.example")["feedback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["event"].as_str().unwrap())
        .collect();
    assert_eq!(later, ["delay", "soft_bounce"]);

    // The suppressed address is skipped by the next letter.
    let before = sink.received().len();
    let batch = json!([{ "Subject": "Again", "Body": "<p>Hi</p>", "Addresses": ["nobody@hard.example", "fine@ok.example"], "Token": "token-next" }]);
    f.app.produce(Some("key-next"), batch.to_string().as_bytes()).await;
    let received = sink.wait_for_count(before + 1, LONG).await;
    assert_eq!(received.last().unwrap().rcpt_tos, ["fine@ok.example"]);
}

#[tokio::test]
async fn an_arf_complaint_suppresses_its_recipient() {
    let sink = SmtpSink::start().await;
    let f = start_with(&sink).await;
    let (id, mail_from) =
        send_letter(&f, &sink, "key-arf", "token-arf", &["user@example.com", "other@example.com"]).await;
    // RFC 5965's example report, to the letter's return path.
    let (rcpt, end) = deliver(f.port, &mail_from, &fixture("arf-rfc5965.eml")).await;
    assert!(rcpt.starts_with("250") && end.starts_with("250"), "{rcpt} / {end}");
    let event = consume(&f.topic, 1, LONG).await[0].json();
    assert_eq!(event["Event"], "complaint");
    assert_eq!(event["Source"], "arf");
    assert_eq!(event["FeedbackType"], "abuse");
    assert_eq!(event["Address"], "user@example.com");
    assert_eq!(event["Token"], "token-arf");
    assert_eq!(
        suppressed(&f.app.raw_documents("letters_suppressions").await),
        [("user@example.com".to_owned(), "complaint".to_owned())]
    );
    let view = letter_view(&f.app, id).await;
    assert_eq!(recipient(&view, "user@example.com")["feedback"][0]["event"], "complaint", "{view:#}");

    // Through the feedback-loop address, the letter is found by the reported message's
    // Message-ID (ours are `<letter id@domain>`).
    // (Another recipient: user@example.com is suppressed now, so a letter to them alone is not sent.)
    let (second, _) = send_letter(&f, &sink, "key-fbl", "token-fbl", &["reader@example.com"]).await;
    let report = String::from_utf8(fixture("arf-rfc5965.eml"))
        .unwrap()
        .replace("8787KJKJ3K4J3K4J3K4J3.mail@example.net", &format!("<{}@mailsender.test>", second.to_hex()))
        .replace("Original-Rcpt-To: <user@example.com>", "Original-Rcpt-To: <reader@example.com>");
    let (rcpt, end) = deliver(f.port, LOOP_ADDRESS, report.as_bytes()).await;
    assert!(rcpt.starts_with("250") && end.starts_with("250"), "{rcpt} / {end}");
    let events = consume(&f.topic, 2, LONG).await;
    let event = events[1].json();
    assert_eq!(
        (event["Event"].as_str(), event["LetterID"].as_str()),
        (Some("complaint"), Some(second.to_hex().as_str()))
    );
    assert_eq!(events[1].key.as_deref(), Some("key-fbl"));
}

#[tokio::test]
async fn bad_input_gets_a_clear_answer_and_the_listener_keeps_serving() {
    let sink = SmtpSink::start().await;
    let f = start_with(&sink).await;
    let (id, mail_from) = send_letter(&f, &sink, "key-bad", "token-bad", &["nobody@hard.example"]).await;
    let paths = ReturnPath::new("bounces", BOUNCE_DOMAIN, &SECRET.to_owned().into());
    assert_eq!(paths.verify(&mail_from), Ok(id));

    // A forged signature, another letter's signature, a foreign domain, a relay attempt: 550.
    let sig = mail_from.split(['.', '@']).nth(1).unwrap().to_owned();
    let forged = format!("bounces+{}.{}@{BOUNCE_DOMAIN}", ObjectId::new().to_hex(), sig);
    for rcpt in
        [forged.as_str(), "postmaster@bounce.mailsender.test", "someone@example.org", "bounces@bounce.mailsender.test"]
    {
        let (reply, _) = deliver(f.port, rcpt, &fixture("dsn-postfix-hard.eml")).await;
        assert!(reply.starts_with("550 5.1.1"), "{rcpt}: {reply}");
    }
    // DATA without an accepted recipient.
    let replies = converse(
        f.port,
        &[Step::Command("HELO mta".into()), Step::Command("MAIL FROM:<>".into()), Step::Command("DATA".into())],
    )
    .await;
    assert!(replies[3].starts_with("554"), "{replies:?}");

    // A valid return path of a letter this deployment does not have: kept, not an event.
    let unknown = ObjectId::new();
    let (rcpt, end) = deliver(f.port, &paths.address(&unknown), &fixture("dsn-postfix-hard.eml")).await;
    assert!(rcpt.starts_with("250") && end.starts_with("250"), "{rcpt} / {end}");
    // A report cut off inside its delivery-status part: kept, not an event.
    let hard = fixture("dsn-postfix-hard.eml");
    let cut = String::from_utf8_lossy(&hard).find("Action: failed").unwrap();
    let (_, end) = deliver(f.port, &mail_from, &hard[..cut]).await;
    assert!(end.starts_with("250"), "{end}");

    // 50 MB: refused at MAIL when declared, and cut off with 552 when not.
    let replies =
        converse(f.port, &[Step::Command("EHLO mta".into()), Step::Command("MAIL FROM:<> SIZE=52428800".into())]).await;
    assert!(replies[1].contains("SIZE 4194304"), "{replies:?}");
    assert!(replies[2].starts_with("552 5.3.4"), "{replies:?}");
    let line = format!("{}\r\n", "x".repeat(998));
    let huge: Vec<u8> = line.as_bytes().repeat(50 * 1024 * 1024 / line.len());
    let (_, end) = deliver(f.port, &mail_from, &huge).await;
    assert!(end.starts_with("552 5.3.4"), "{end}");

    let unparsed = f.app.raw_documents("letters_feedback_unparsed").await;
    let mut reasons: Vec<String> = unparsed.iter().map(|d| d.get_str("reason").unwrap().to_owned()).collect();
    reasons.sort();
    assert_eq!(reasons, ["the delivery-status part is cut off (its MIME boundary never closes)", "unknown letter"]);
    let kept = unparsed.iter().find(|d| d.get_str("reason") == Ok("unknown letter")).unwrap();
    assert_eq!(kept.get_object_id("letter_id").unwrap(), unknown);
    assert_eq!(kept.get_binary_generic("raw").unwrap(), &fixture("dsn-postfix-hard.eml"), "kept whole");
    let text = metrics(&f.app).await;
    assert_eq!(metric_value(&text, "mailsender_feedback_unparsed_total"), Some(2.0), "{text}");
    assert!(f.app.raw_documents("letters_suppressions").await.is_empty(), "nothing above suppressed anyone");

    // The listener still serves: the whole report now goes through.
    let (_, end) = deliver(f.port, &mail_from, &fixture("dsn-postfix-hard.eml")).await;
    assert!(end.starts_with("250"), "{end}");
    let event = consume(&f.topic, 1, LONG).await[0].json();
    assert_eq!(
        (event["Event"].as_str(), event["LetterID"].as_str()),
        (Some("hard_bounce"), Some(id.to_hex().as_str()))
    );
}

/// An MTA's connection left in the middle of its DATA: the first half of the message sent, the
/// rest (and the final dot) not yet.
struct Stalled {
    read: BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
    rest: Vec<u8>,
}

/// Opens a delivery of `message` to `rcpt` and stops halfway through its data.
async fn stall(port: u16, rcpt: &str, message: &[u8]) -> Stalled {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut replies = vec![reply(&mut read).await];
    for command in
        ["EHLO slow-mta.example".to_owned(), "MAIL FROM:<>".to_owned(), format!("RCPT TO:<{rcpt}>"), "DATA".to_owned()]
    {
        write.write_all(format!("{command}\r\n").as_bytes()).await.unwrap();
        replies.push(reply(&mut read).await);
    }
    assert!(replies[4].starts_with("354"), "{replies:?}");
    let stuffed = dot_stuffed(message);
    let half = stuffed[..stuffed.len() / 2].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    write.write_all(&stuffed[..half]).await.unwrap();
    write.flush().await.unwrap();
    Stalled { read, write, rest: stuffed[half..].to_vec() }
}

impl Stalled {
    /// Sends the rest of the message; the reply to its final dot.
    async fn finish(mut self) -> String {
        self.write.write_all(&self.rest).await.unwrap();
        reply(&mut self.read).await
    }
}

/// Connections are served in parallel: two MTAs stalled halfway through their DATA (a slow
/// link, a large report trickling in) hold back no one, and are recorded once they finish. The
/// listener used to read two messages at a time, so a third sender waited for its 354 until one
/// of the stalled ones finished or timed out (ten minutes).
#[tokio::test]
async fn senders_stalled_in_data_hold_back_no_other_report() {
    let sink = SmtpSink::start().await;
    let f = start_with(&sink).await;
    let addresses = ["nobody@hard.example", "later@slow.example", "fine@ok.example"];
    let (id, mail_from) = send_letter(&f, &sink, "key-stall", "token-stall", &addresses).await;

    let first = stall(f.port, &mail_from, &fixture("dsn-postfix-hard.eml")).await;
    let second = stall(f.port, &mail_from, &fixture("dsn-postfix-delay.eml")).await;
    let third =
        tokio::time::timeout(Duration::from_secs(20), deliver(f.port, &mail_from, &fixture("dsn-postfix-soft.eml")))
            .await
            .expect("a third report answered while two senders are stalled in their DATA");
    assert!(third.1.starts_with("250"), "{third:?}");
    let event = consume(&f.topic, 1, LONG).await[0].json();
    assert_eq!(
        (event["Event"].as_str(), event["LetterID"].as_str()),
        (Some("soft_bounce"), Some(id.to_hex().as_str()))
    );

    // The stalled senders finish: both reports recorded, nothing lost.
    let (first, second) = tokio::join!(first.finish(), second.finish());
    assert!(first.starts_with("250"), "{first}");
    assert!(second.starts_with("250"), "{second}");
    let events = consume(&f.topic, 3, LONG).await;
    let mut kinds: Vec<String> = events.iter().map(|e| e.json()["Event"].as_str().unwrap().to_owned()).collect();
    kinds.sort();
    assert_eq!(kinds, ["delay", "hard_bounce", "soft_bounce"]);
    assert_eq!(
        suppressed(&f.app.raw_documents("letters_suppressions").await),
        [("nobody@hard.example".to_owned(), "hard_bounce".to_owned())]
    );
}

async fn start_with(sink: &SmtpSink) -> Feedback {
    let port = free_port();
    let topic = unique("feedback-");
    let app = TestApp::spawn(
        sink,
        &[
            ("BOUNCE_DOMAIN", BOUNCE_DOMAIN),
            ("BOUNCE_SECRET", SECRET),
            ("FEEDBACK_SMTP_ADDR", &format!("127.0.0.1:{port}")),
            ("FEEDBACK_LOOP_ADDRESS", LOOP_ADDRESS),
            ("KAFKA_TOPIC_FEEDBACK", &topic),
        ],
    )
    .await;
    Feedback { app, port, topic }
}
