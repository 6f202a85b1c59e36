//! The suppression topic: other systems (relay bounce and complaint webhooks) add and remove
//! entries with `{"Address", "Reason", "Remove"?}`. A message that is not that goes to the
//! dead-letter topic, as a malformed input batch does.

use std::time::Duration;

use rdkafka::{
    Message as _,
    consumer::{Consumer as _, StreamConsumer},
    message::{Header, OwnedHeaders},
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::suppression::Suppressions;
use crate::{address::Recipient, kafka::StatusProducer};

/// One request on the suppression topic.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(rename = "Address", alias = "address")]
    address: String,
    #[serde(rename = "Reason", alias = "reason", default)]
    reason: Option<String>,
    #[serde(rename = "Remove", alias = "remove", default)]
    remove: bool,
}

const EXPECTED: &str = r#"a JSON object {"Address": string (a mailbox), "Reason": string (required unless removing), "Remove": bool (optional)}"#;

/// What a message asks for, or why it is malformed.
fn parse(payload: Option<&[u8]>) -> Result<(Recipient, Option<String>), String> {
    let request: Request =
        serde_json::from_slice(payload.unwrap_or_default()).map_err(|e| format!("{e}; expected {EXPECTED}"))?;
    // Parsed into the one type every suppression is keyed through (`Recipient::key`).
    let address = Recipient::parse(&request.address).map_err(|e| format!("Address: {e}"))?;
    let reason = request.reason.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
    match (request.remove, reason) {
        (true, _) => Ok((address, None)),
        (false, Some(reason)) if reason.len() <= 200 => Ok((address, Some(reason))),
        (false, Some(_)) => Err("Reason is longer than 200 characters".to_owned()),
        (false, None) => Err(format!("Reason is required to add a suppression; expected {EXPECTED}")),
    }
}

pub struct SuppressionTopic {
    pub consumer: StreamConsumer,
    pub topic: String,
    pub topic_dlq: String,
    pub suppressions: Suppressions,
    pub producer: StatusProducer,
}

impl SuppressionTopic {
    pub async fn run(self, shutdown: CancellationToken) {
        if let Err(error) = self.consumer.subscribe(&[&self.topic]) {
            tracing::error!(error = %error, topic = %self.topic, "cannot subscribe to the suppression topic");
            return;
        }
        tracing::info!(topic = %self.topic, "reading the suppression topic");
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                message = self.consumer.recv() => message,
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    // A missing topic (KAFKA_CREATE_TOPICS=false) errors at once: do not spin.
                    tracing::warn!(error = %error, topic = %self.topic, "reading the suppression topic");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                    continue;
                }
            };
            // Retried until durable: the offset moves on only past what is stored.
            let mut pause = Duration::from_millis(200);
            loop {
                match self.handle(&message).await {
                    Ok(()) => break,
                    Err(error) if !shutdown.is_cancelled() => {
                        tracing::warn!(error = format!("{error:#}"), "suppression request not stored yet; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    Err(_) => return,
                }
            }
            if let Err(error) = self.consumer.store_offset_from_message(&message) {
                tracing::warn!(error = %error, "storing a suppression topic offset");
            }
        }
    }

    async fn handle(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()> {
        match parse(message.payload()) {
            Ok((address, Some(reason))) => self.suppressions.add(&address, &reason, "kafka").await,
            Ok((address, None)) => self.suppressions.remove(&address).await.map(|_| ()),
            Err(reason) => {
                tracing::warn!(partition = message.partition(), offset = message.offset(), reason = %reason, "malformed suppression request; sent to the dead-letter topic");
                let headers = OwnedHeaders::new()
                    .insert(Header { key: "x-error", value: Some(reason.as_bytes()) })
                    .insert(Header { key: "x-source-topic", value: Some(self.topic.as_bytes()) })
                    .insert(Header {
                        key: "x-source-partition",
                        value: Some(message.partition().to_string().as_bytes()),
                    })
                    .insert(Header { key: "x-source-offset", value: Some(message.offset().to_string().as_bytes()) });
                let payload = message.payload().unwrap_or_default();
                let payload = &payload[..payload.len().min(1 << 20)];
                self.producer
                    .send(&self.topic_dlq, message.key(), payload, Some(headers))
                    .await
                    .map_err(|e| anyhow::anyhow!("producing to the dead-letter topic: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        let recipient = |a: &str| Recipient::parse(a).unwrap();
        assert_eq!(
            parse(Some(br#"{"Address":"A@x.org","Reason":"complaint"}"#)),
            Ok((recipient("A@x.org"), Some("complaint".to_owned())))
        );
        assert_eq!(parse(Some(br#"{"Address":"a@x.org","Remove":true}"#)), Ok((recipient("a@x.org"), None)));
        let (idn, _) = parse(Some(r#"{"Address":"ivan@пример.рф","Reason":"complaint"}"#.as_bytes())).unwrap();
        assert_eq!(idn.key(), "ivan@xn--e1afmkfd.xn--p1ai");
        for bad in [&b"nope"[..], br#"{"Address":"a@x.org"}"#, br#"{"Address":"not an address","Reason":"r"}"#, b"[]"] {
            assert!(parse(Some(bad)).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse(None).is_err());
    }
}
