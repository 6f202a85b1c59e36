//! Issue 22, the one-click and suppression edges: links in RFC 3986 normal form that survive
//! clients which normalise URLs, one canonical key for an address (an internationalised domain
//! in UTF-8 or punycode), a kilobyte token that still gives a working link, and replays of one
//! link that publish one event.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::doc;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer as _},
};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);
const SECRET: &str = "a-test-secret-of-some-length";
const TEMPLATE: &str = "https://unsub.mailsender.test/unsub?a={address}&l={letter_id}&t={token}";

/// Individual mode with the one-click endpoint on a local port; its base URL and event topic.
async fn spawn_one_click(sink: &SmtpSink) -> (TestApp, String, String) {
    let port = free_port();
    let unsubscribed = unique("links-unsubscribed");
    let public_addr = format!("127.0.0.1:{port}");
    let app = TestApp::spawn(
        sink,
        &[
            ("SMTP_DELIVERY", "individual"),
            ("LIST_UNSUBSCRIBE_URL", TEMPLATE),
            ("UNSUBSCRIBE_SECRET", SECRET),
            ("PUBLIC_HTTP_ADDR", &public_addr),
            ("KAFKA_TOPIC_UNSUBSCRIBED", &unsubscribed),
        ],
    )
    .await;
    (app, format!("http://127.0.0.1:{port}"), unsubscribed)
}

fn mailing(subject: &str, token: &str, addresses: &[&str]) -> Value {
    json!({ "Subject": subject, "Body": "<p>Hello</p>", "Addresses": addresses, "Token": token })
}

/// The link pointed at the local endpoint, its bytes otherwise unchanged.
fn local(link: &str, public: &str) -> String {
    link.replacen("https://unsub.mailsender.test", public, 1)
}

async fn post_one_click(url: &str) -> u16 {
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// An equivalent URI as a normalising client could send it (RFC 3986 §6.2.2): every
/// unreserved punctuation character percent-encoded, every hex digit lower-case.
fn equivalent_variant(url: &str) -> String {
    let (origin, rest) = url.split_at(url.find("/unsub").expect("the template's path"));
    let mut out = origin.to_owned();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '%' => {
                out.push('%');
                out.extend(chars.by_ref().take(2).map(|h| h.to_ascii_lowercase()));
            }
            '.' | '-' | '_' | '~' => out.push_str(&format!("%{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Messages on `topic` (every partition), counted from the broker's offsets: each one, not a
/// set of distinct ones.
fn count_messages(topic: &str) -> i64 {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", unique("counter-")).create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let partitions = &metadata.topics()[0].partitions();
    assert!(!partitions.is_empty(), "{topic} has no partitions");
    partitions
        .iter()
        .map(|p| {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap();
            high - low
        })
        .sum()
}

async fn suppressions_of(app: &TestApp) -> Vec<mongodb::bson::Document> {
    app.raw_documents("letters_suppressions").await
}

/// A link is written in normal form (unreserved characters as themselves, upper-case hex), and
/// the endpoint accepts it byte for byte and in an equivalent form a normalising client sends
/// (unreserved characters encoded, hex in lower case); a tampered link gets 403; one
/// suppression results.
#[tokio::test]
async fn one_click_links_are_in_normal_form_and_equivalent_uris_are_accepted() {
    let sink = SmtpSink::start().await;
    let (app, public, unsubscribed) = spawn_one_click(&sink).await;
    let address = "first.last-x_y~z@mail-host.example.org";
    let token = "tok.en-1_~ a/b";
    let (status, body) = app.post("/post", json!([mailing("normal form", token, &[address])]).to_string()).await;
    assert_eq!(status, 202, "{body}");
    let received = sink.wait_for_count(1, LONG).await.remove(0);
    let link = https_link(&received);
    let exact = local(&link, &public);
    let variant = equivalent_variant(&exact);
    assert!(variant.contains("%2e") && variant.contains("%2d") && variant.contains("%2f"), "{variant}");
    let mut tampered = exact.replacen("mail", "mall", 1);
    assert_ne!(tampered, exact);
    assert_eq!(post_one_click(&tampered).await, 403, "{tampered}");
    tampered = equivalent_variant(&tampered);
    assert_eq!(post_one_click(&tampered).await, 403, "{tampered}");

    assert_eq!(post_one_click(&variant).await, 200, "the normalised form of {exact}");
    assert_eq!(post_one_click(&exact).await, 200, "{exact}");
    let entries = suppressions_of(&app).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].get_str("_id").unwrap(), address);
    let event = consume(&unsubscribed, 1, LONG).await[0].json();
    assert_eq!((event["Address"].as_str(), event["Token"].as_str()), (Some(address), Some(token)), "{event}");
    assert!(
        link.contains("a=first.last-x_y~z%40mail-host.example.org&") && link.contains("&t=tok.en-1_~%20a%2Fb&sig="),
        "not in normal form: {link}"
    );
}

/// Five POSTs of one link: five 200s, one suppression, and exactly one `unsubscribed` event on
/// the topic (its messages counted, not deduplicated).
#[tokio::test]
async fn replays_of_one_link_publish_one_event() {
    let sink = SmtpSink::start().await;
    let (app, public, unsubscribed) = spawn_one_click(&sink).await;
    let (status, body) = app
        .post("/post", json!([mailing("replays", "tok-1", &["ann@example.org", "bob@example.org"])]).to_string())
        .await;
    assert_eq!(status, 202, "{body}");
    let received = sink.wait_for_count(2, LONG).await;
    let ann = received.iter().find(|m| m.rcpt_tos == ["ann@example.org"]).expect("Ann's copy");
    let url = local(&https_link(ann), &public);
    for replay in 0..5 {
        assert_eq!(post_one_click(&url).await, 200, "replay {replay}");
    }
    // Every 200 above came after the broker acknowledged whatever that request published, so
    // the count is final.
    assert_eq!(count_messages(&unsubscribed), 1, "one event per link and address");
    let entries = suppressions_of(&app).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    // Another recipient's link is another event.
    let bob = received.iter().find(|m| m.rcpt_tos == ["bob@example.org"]).expect("Bob's copy");
    assert_eq!(post_one_click(&local(&https_link(bob), &public)).await, 200);
    assert_eq!(count_messages(&unsubscribed), 2);
}

/// A kilobyte token with punctuation (a JWT) and `{token}` in the template: `/post` answers 202,
/// the letter is sent with a link that fits a header line, and that link unsubscribes, the event
/// carrying the whole token (read from the letter).
#[tokio::test]
async fn a_kilobyte_token_gives_a_sent_letter_with_a_working_link() {
    let sink = SmtpSink::start().await;
    let (app, public, unsubscribed) = spawn_one_click(&sink).await;
    let token = format!(
        "eyJhbGciOiJIUzI1NiJ9.{}.{}",
        "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ+/=".repeat(16),
        "sig/+=!*'()".repeat(18)
    );
    let token = &token[..1000];
    assert_eq!(token.len(), 1000);
    let (status, body) =
        app.post("/post", json!([mailing("long token", token, &["jwt.user@example.org"])]).to_string()).await;
    assert_eq!(status, 202, "{body}");
    let letters = app.wait_all_final(1, LONG).await;
    assert_eq!(letters[0].status, mailsender::model::Status::Sent, "{:?}", letters[0]);
    let received = sink.wait_for_count(1, LONG).await.remove(0);
    assert!(received.max_line <= 998, "a line of {} octets", received.max_line);
    let link = https_link(&received);
    assert!(link.len() <= 900, "{} octets: {link}", link.len());
    assert!(link.contains(&format!("&t=!{}&sig=", letters[0].id.to_hex())), "{link}");
    assert_eq!(post_one_click(&local(&link, &public)).await, 200, "{link}");
    let event = consume(&unsubscribed, 1, LONG).await[0].json();
    assert_eq!(event["Token"], token, "{event}");
    assert_eq!(event["Address"], "jwt.user@example.org", "{event}");
    // The reference is signed: another letter's id in it is refused.
    let forged = local(&link, &public).replacen(&letters[0].id.to_hex(), "0123456789abcdef01234567", 1);
    assert_eq!(post_one_click(&forged).await, 403);
}

/// A suppression given on the topic in UTF-8 (`ivan@пример.рф`) stops letters to that address
/// in either form; an entry stored by an earlier version under the UTF-8 form still holds.
#[tokio::test]
async fn a_utf8_suppression_of_an_internationalised_domain_holds_in_every_form() {
    let sink = SmtpSink::start().await;
    let topic = unique("links-suppressions");
    let app = TestApp::spawn(&sink, &[("KAFKA_TOPIC_SUPPRESSIONS", &topic)]).await;
    produce(&topic, Some("ivan@пример.рф"), r#"{"Address":"ivan@пример.рф","Reason":"complaint"}"#.as_bytes()).await;
    let entries = wait_for("the suppression stored", LONG, || async {
        let entries = suppressions_of(&app).await;
        (!entries.is_empty()).then_some(entries)
    })
    .await;
    assert_eq!(entries[0].get_str("_id").unwrap(), "ivan@xn--e1afmkfd.xn--p1ai", "{entries:?}");
    // As an earlier version stored it: keyed by the address as given, lower-cased.
    let mongo = mongodb::Client::with_uri_str(mongo_uri()).await.unwrap();
    mongo
        .database(&app.database)
        .collection::<mongodb::bson::Document>("letters_suppressions")
        .insert_one(
            doc! { "_id": "olga@пример.рф", "address": "Olga@Пример.рф", "reason": "legacy", "source": "kafka" },
        )
        .await
        .unwrap();

    let batch = json!([
        mailing("utf8 form", "t1", &["ivan@пример.рф", "ok@example.org"]),
        mailing("ascii form", "t2", &["IVAN@xn--e1afmkfd.xn--p1ai"]),
        mailing("old entry", "t3", &["olga@ПРИМЕР.рф", "ok2@example.org"]),
    ]);
    let (status, body) = app.post("/post", batch.to_string()).await;
    assert_eq!(status, 202, "{body}");
    let letters = app.wait_all_final(3, LONG).await;
    let by_subject = |s: &str| letters.iter().find(|l| l.subject == s).unwrap().clone();
    let utf8 = by_subject("utf8 form");
    assert_eq!(utf8.delivered, vec!["ok@example.org"], "{utf8:?}");
    assert_eq!(utf8.rejected.len(), 1, "{utf8:?}");
    assert_eq!(utf8.rejected[0].address, "ivan@пример.рф");
    assert_eq!(utf8.rejected[0].reply, "suppressed: complaint");
    let ascii = by_subject("ascii form");
    assert_eq!(ascii.status, mailsender::model::Status::Error, "{ascii:?}");
    assert_eq!(ascii.rejected[0].reply, "suppressed: complaint", "{ascii:?}");
    let old = by_subject("old entry");
    assert_eq!(old.delivered, vec!["ok2@example.org"], "{old:?}");
    assert_eq!(old.rejected[0].reply, "suppressed: legacy", "{old:?}");

    let statuses = app.consume(&app.topic_out, 3, LONG).await;
    let status = statuses.iter().map(Consumed::json).find(|s| s["Subject"] == "utf8 form").unwrap();
    assert_eq!(status["Suppressed"], json!(["ivan@пример.рф"]), "{status}");
    let rcpts: Vec<String> = sink.received().iter().flat_map(|m| m.rcpt_tos.clone()).collect();
    assert_eq!(rcpts.len(), 2, "{rcpts:?}");
    assert!(rcpts.iter().all(|r| r.starts_with("ok")), "sent to a suppressed address: {rcpts:?}");
}
