//! The Kafka section: brokers, topics, the consumer group and the producer.

use std::time::Duration;

use super::{ConfigError, Env};

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic_in: String,
    pub topic_out: String,
    pub topic_dlq: String,
    pub group_id: String,
    /// Static group membership: a restarted pod with the same id gets its partitions back at
    /// once instead of waiting out the session timeout of its previous incarnation.
    pub group_instance_id: Option<String>,
    pub session_timeout: Duration,
    /// How long the producer keeps trying to deliver a message before giving up on it.
    pub message_timeout: Duration,
    /// How often librdkafka reports statistics (consumer lag, requests sent) to the metrics. Each
    /// report costs a client ~3.3 M instructions (its latency histograms' percentiles, issue 23),
    /// so once a minute: the lag and stall alerts look over 5 and 15 minutes.
    pub statistics_interval: Duration,
    /// Partition count used when the service creates a missing topic.
    pub partitions: i32,
    pub create_topics: bool,
    /// Most letters gathered from Kafka before they are written to MongoDB in one insert.
    pub ingest_batch: usize,
    /// Longest a partial ingest batch waits for more messages before it is written.
    pub ingest_linger: Duration,
    /// `fetch.wait.max.ms` of the consumers: Kafka answers a fetch as soon as data is there, so
    /// this only sets how often an idle consumer asks; some brokers (tansu) hold every fetch for
    /// the whole wait, and there it is the floor of a letter's time from produce to ingest.
    pub fetch_wait: Duration,
    /// Bodies larger than this are left out of status messages (`BodyOmitted: true`).
    pub status_body_max_bytes: usize,
    /// The largest input message the consumer fetches. It must cover whatever the topic accepts,
    /// or the partition stops at the first larger message.
    pub max_message_bytes: usize,
    /// Dead letters are cut to this size, so the copy fits the broker's own limit.
    pub dlq_max_bytes: usize,
    /// A partition whose position has not moved this long, with messages waiting, is reported
    /// stalled (gauge and warning).
    pub stall_warning: Duration,
    /// What a mailing's `Attachments` may hold (issue 19), checked at `POST /post` and at ingest.
    pub attachments: AttachmentLimits,
}

/// Limits on a mailing's `Attachments`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachmentLimits {
    /// `ATTACHMENTS_MAX_COUNT`: most files per mailing.
    pub max_count: usize,
    /// `ATTACHMENTS_MAX_BYTES`: most bytes of all a mailing's files together, decoded.
    pub max_bytes: usize,
}

impl Default for AttachmentLimits {
    /// 10 files: an invoice, a ticket and their terms take a few; more is an archive, better sent
    /// as a link. 7 MiB: base64 and its line ends make the message 1.37 times larger, about 9.6 MB,
    /// inside the 10 MB that Postmark, SES's v1 API and many corporate relays take whole, and under
    /// half of `DISPATCH_MAX_BYTES`' 16 MiB, so letters that full are still claimed two at a time.
    fn default() -> Self {
        AttachmentLimits { max_count: 10, max_bytes: 7 << 20 }
    }
}

pub(super) fn read(env: &Env) -> Result<KafkaConfig, ConfigError> {
    Ok(KafkaConfig {
        brokers: env.required("KAFKA_BROKERS", "a comma-separated list of host:port")?,
        topic_in: env.string("KAFKA_TOPIC_MAILSENDER", "mts-to-mailsender"),
        topic_out: env.string("KAFKA_TOPIC_PROFILE", "mts-to-profile"),
        topic_dlq: env.string("KAFKA_TOPIC_DLQ", "mts-to-mailsender.dlq"),
        group_id: env.string("KAFKA_GROUPID", "mailsender"),
        group_instance_id: env.optional("KAFKA_GROUP_INSTANCE_ID"),
        session_timeout: env.positive_duration("KAFKA_SESSION_TIMEOUT", "45s")?,
        message_timeout: env.positive_duration("KAFKA_MESSAGE_TIMEOUT", "60s")?,
        statistics_interval: env.positive_duration("KAFKA_STATISTICS_INTERVAL", "60s")?,
        partitions: env
            .parse("KAFKA_TOPIC_PARTITIONS", 3, "a partition count from 1 to 1000", |n| (1..=1000).contains(n))?,
        create_topics: env.boolean("KAFKA_CREATE_TOPICS", true)?,
        ingest_batch: env.parse("INGEST_BATCH", 500, "a letter count from 1 to 10000", |n| (1..=10_000).contains(n))?,
        ingest_linger: env.duration("INGEST_LINGER", "20ms")?,
        fetch_wait: env.duration_within(
            "KAFKA_FETCH_WAIT_MAX",
            "100ms",
            "a duration from 1ms to 5s",
            Duration::from_millis(1)..=Duration::from_secs(5),
        )?,
        max_message_bytes: env.parse("KAFKA_MAX_MESSAGE_BYTES", 64 << 20, "a byte count from 1 MiB to 1 GiB", |n| {
            ((1 << 20)..=(1 << 30)).contains(n)
        })?,
        dlq_max_bytes: env.parse("KAFKA_DLQ_MAX_BYTES", 1 << 20, "a byte count from 1 KiB to 2 MiB", |n| {
            ((1 << 10)..=(2 << 20)).contains(n)
        })?,
        stall_warning: env.positive_duration("KAFKA_STALL_WARNING", "2m")?,
        attachments: AttachmentLimits {
            max_count: env.parse(
                "ATTACHMENTS_MAX_COUNT",
                AttachmentLimits::default().max_count,
                "a file count from 0 (no attachments) to 100",
                |n| *n <= 100,
            )?,
            max_bytes: env.parse(
                "ATTACHMENTS_MAX_BYTES",
                AttachmentLimits::default().max_bytes,
                "a byte count from 0 to 64 MiB",
                |n| *n <= 64 << 20,
            )?,
        },
        status_body_max_bytes: env.parse(
            "STATUS_BODY_MAX_BYTES",
            64 * 1024,
            "a byte count from 0 to 1048576",
            |n| *n <= 1 << 20,
        )?,
    })
}
