//! The sandbox (`SMTP_SANDBOX`, issue 20) against the real binary: the whole pipeline runs (Kafka
//! in, MongoDB, the budget, status messages out) but no message reaches a relay, and the
//! simulator addresses make their events through the path real DSNs take: the feedback topic,
//! the suppression list, `GET /letters/{id}`.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use mailsender::model::Status;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);
const LAST_REPLY: &str = "250 2.0.0 sandbox: not handed to a relay";

fn simulator(local: &str) -> String {
    format!("{local}@simulator.mailsender.invalid")
}

fn mailing(address: &str, token: &str) -> Value {
    json!({ "Subject": "Sandbox", "Body": "<p>Hello</p>", "Addresses": [address], "Token": token,
            "Metadata": { "run": "ci-1" } })
}

#[tokio::test]
async fn a_sandbox_batch_reaches_no_relay_and_its_simulator_addresses_make_their_events() {
    // A relay the service is told about, and must not use.
    let sink = SmtpSink::start().await;
    let topic = unique("feedback-");
    let app = TestApp::spawn(&sink, &[("SMTP_SANDBOX", "true"), ("KAFKA_TOPIC_FEEDBACK", &topic)]).await;

    let addresses = [
        simulator("bounce"),
        simulator("softbounce"),
        simulator("complaint"),
        simulator("Delay+run-1"),
        simulator("success"),
        "reader@example.org".to_owned(),
    ];
    let batch: Vec<Value> = addresses.iter().enumerate().map(|(i, a)| mailing(a, &format!("token-{i}"))).collect();
    app.produce(Some("key-sandbox"), Value::Array(batch).to_string().as_bytes()).await;
    let letters = app.wait_all_final(addresses.len(), LONG).await;
    for letter in &letters {
        assert_eq!(letter.status, Status::Sent, "{letter:?}");
        assert_eq!(letter.last_reply.as_deref(), Some(LAST_REPLY), "{letter:?}");
        assert_eq!(letter.delivered, letter.addresses, "every recipient taken");
    }
    let statuses = app.consume(&app.topic_out, addresses.len(), LONG).await;
    for status in &statuses {
        let status = status.json();
        assert_eq!((status["Status"].as_str(), status["LastReply"].as_str()), (Some("sent"), Some(LAST_REPLY)));
    }

    // One event per simulator address that makes one, with its kind, keyed and tokened as a
    // real event is; `success@` and the ordinary address make none.
    let events = app.consume(&topic, 4, LONG).await;
    let by_address: BTreeMap<String, Value> =
        events.iter().map(|e| (e.json()["Address"].as_str().unwrap().to_lowercase(), e.json())).collect();
    let kinds: Vec<(&str, &str)> = by_address.iter().map(|(a, e)| (a.as_str(), e["Event"].as_str().unwrap())).collect();
    assert_eq!(
        kinds,
        [
            ("bounce@simulator.mailsender.invalid", "hard_bounce"),
            ("complaint@simulator.mailsender.invalid", "complaint"),
            ("delay+run-1@simulator.mailsender.invalid", "delay"),
            ("softbounce@simulator.mailsender.invalid", "soft_bounce"),
        ]
    );
    assert!(events.iter().all(|e| e.key.as_deref() == Some("key-sandbox")), "keyed by the letter's Kafka key");
    let bounce = &by_address["bounce@simulator.mailsender.invalid"];
    let bounce_letter = letters.iter().find(|l| l.addresses == [simulator("bounce")]).unwrap();
    assert_eq!(bounce["LetterID"], bounce_letter.id.to_hex());
    assert_eq!(bounce["Token"], bounce_letter.token);
    assert_eq!((bounce["Status"].as_str(), bounce["Source"].as_str()), (Some("5.1.1"), Some("sandbox")));
    assert_eq!(bounce["Metadata"], json!({ "run": "ci-1" }));
    assert_eq!(by_address["complaint@simulator.mailsender.invalid"]["FeedbackType"], "abuse");

    // The hard bounce and the complaint are suppressed; the soft bounce and the delay are not.
    assert_eq!(
        suppressed(&app.raw_documents("letters_suppressions").await),
        [
            ("bounce@simulator.mailsender.invalid".to_owned(), "hard_bounce".to_owned()),
            ("complaint@simulator.mailsender.invalid".to_owned(), "complaint".to_owned()),
        ]
    );
    // Made after the letter's outcome was stored, as a relay's report would be.
    let recorded = app.raw_documents("letters_feedback").await;
    assert_eq!(recorded.len(), 4);
    for record in &recorded {
        let letter = letters.iter().find(|l| Ok(l.id) == record.get_object_id("letter_id")).unwrap();
        // The MongoDB-wire server in use may hand an Int64 back as an Int32.
        let time_ms = record.get_i64("time_ms").or_else(|_| record.get_i32("time_ms").map(i64::from)).unwrap();
        assert!(time_ms >= letter.updated_ms, "{record} before {letter:?}");
    }
    let (status, view) = app.get(&format!("/letters/{}", bounce_letter.id.to_hex())).await;
    assert_eq!(status, 200, "{view}");
    let view: Value = serde_json::from_str(&view).unwrap();
    let recipient = &view["recipients"][0];
    assert_eq!(
        (recipient["outcome"].as_str(), recipient["feedback"][0]["event"].as_str()),
        (Some("delivered"), Some("hard_bounce")),
        "{view:#}"
    );
    let metrics = app.get("/metrics").await.1;
    assert_eq!(
        metric_value(&metrics, r#"mailsender_feedback_events_total{kind="hard_bounce",source="sandbox"}"#),
        Some(1.0),
        "{metrics}"
    );

    // A later letter skips the suppressed addresses and is sent to the rest.
    let later = json!([{ "Subject": "Again", "Body": "<p>Hi</p>", "Token": "token-later",
        "Addresses": [simulator("bounce"), simulator("complaint"), "reader@example.org"] }]);
    app.produce(Some("key-later"), later.to_string().as_bytes()).await;
    let letters = app.wait_all_final(addresses.len() + 1, LONG).await;
    let later = letters.iter().find(|l| l.token == "token-later").unwrap();
    assert_eq!(later.status, Status::Sent);
    assert_eq!(later.delivered, ["reader@example.org"]);
    let skipped: Vec<(&str, &str)> = later.rejected.iter().map(|r| (r.address.as_str(), r.reply.as_str())).collect();
    assert_eq!(
        skipped,
        [
            ("bounce@simulator.mailsender.invalid", "suppressed: hard_bounce"),
            ("complaint@simulator.mailsender.invalid", "suppressed: complaint")
        ]
    );

    // Nothing reached the relay: not a message, not a connection.
    assert!(sink.received().is_empty(), "{:?}", sink.received());
    assert!(sink.transcript().is_empty(), "the sandbox opened a connection: {:?}", sink.transcript());
    let (_, index) = app.get("/").await;
    assert_eq!(serde_json::from_str::<Value>(&index).unwrap()["sandbox"], true, "{index}");
}

#[tokio::test]
async fn the_sandbox_starts_and_sends_without_any_relay() {
    // No SMTP_HOST at all (an empty value is unset): nothing to reach, and ready all the same.
    let sink = SmtpSink::start().await;
    let app =
        TestApp::spawn(&sink, &[("SMTP_SANDBOX", "true"), ("SMTP_HOST", ""), ("SMTP_DELIVERY", "individual")]).await;
    // Ready once the consumer runs, with no relay to reach.
    wait_for("readiness", LONG, || async { (app.get("/ready").await.0 == 200).then_some(()) }).await;
    let (_, ready) = app.get("/ready").await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(
        (ready["checks"]["smtp"].as_str(), ready["smtp_relays"].as_array().map(Vec::len)),
        (Some("ok"), Some(0))
    );
    let batch = json!([{ "Subject": "s", "Body": "<p>b</p>", "Token": "t",
        "Addresses": [simulator("success"), "a@example.org", "b@example.org"] }]);
    app.produce(Some("k"), batch.to_string().as_bytes()).await;
    let letters = app.wait_all_final(1, LONG).await;
    assert_eq!((letters[0].status, letters[0].last_reply.as_deref()), (Status::Sent, Some(LAST_REPLY)));
    assert_eq!(letters[0].delivered.len(), 3, "a copy each, none handed over");
    assert!(sink.transcript().is_empty());
}
