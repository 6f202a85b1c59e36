//! Kafka client set-up shared by the stages: producer, consumer and topic creation.
//!
//! librdkafka's defaults are sized for large brokers and machines (a consumer may prefetch up to
//! 64 MiB per partition); the values here bound memory to a few MiB, which is plenty for a
//! service whose throughput is capped by SMTP.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use rdkafka::{
    ClientConfig, ClientContext, Statistics,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaResult,
    producer::FutureProducer,
    types::RDKafkaErrorCode,
};

use crate::{
    config::KafkaConfig,
    metrics::{ClientLabel, Metrics, PartitionLabel},
};

fn base(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "mailsender")
        .set("socket.keepalive.enable", "true")
        .set("reconnect.backoff.max.ms", "2000");
    client
}

pub type StatusProducer = FutureProducer<StatsContext>;

pub fn producer(config: &KafkaConfig, metrics: Arc<Metrics>) -> anyhow::Result<StatusProducer> {
    base(config)
        .set("acks", "all")
        .set("linger.ms", "5")
        // Undelivered status messages stay `unreported` in MongoDB and are republished later,
        // so the producer need not hold them for long during a broker outage.
        .set("message.timeout.ms", config.message_timeout.as_millis().to_string())
        .set("queue.buffering.max.kbytes", "8192")
        .set("message.max.bytes", "2097152")
        .set("statistics.interval.ms", config.statistics_interval.as_millis().to_string())
        .create_with_context(StatsContext { metrics, client: "producer", sent: AtomicI64::new(0) })
        .context("creating the Kafka producer")
}

/// Turns librdkafka's statistics into metrics: requests sent (a cumulative total in each
/// report, turned into counter increments) and, for the consumer, lag per partition.
pub struct StatsContext {
    pub metrics: Arc<Metrics>,
    pub client: &'static str,
    sent: AtomicI64,
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        let before = self.sent.swap(statistics.tx, Ordering::Relaxed);
        if statistics.tx > before {
            self.metrics
                .kafka_requests
                .get_or_create(&ClientLabel { client: self.client })
                .inc_by((statistics.tx - before) as u64);
        }
        for topic in statistics.topics.values() {
            for (partition, stats) in &topic.partitions {
                if *partition >= 0 && stats.consumer_lag >= 0 {
                    let label = PartitionLabel { partition: partition.to_string() };
                    self.metrics.consumer_lag.get_or_create(&label).set(stats.consumer_lag);
                }
            }
        }
    }
}

impl rdkafka::producer::ProducerContext for StatsContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Logs rebalances and failed commits.
impl ConsumerContext for StatsContext {
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => tracing::info!(partitions = partitions.count(), "partitions assigned"),
            Rebalance::Revoke(partitions) => tracing::info!(partitions = partitions.count(), "partitions revoked"),
            Rebalance::Error(error) => tracing::warn!(error = %error, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _: &rdkafka::TopicPartitionList) {
        if let Err(error) = result
            && !matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::NoOffset))
        {
            tracing::warn!(error = %error, "offset commit failed");
        }
    }
}

pub type IngestConsumer = StreamConsumer<StatsContext>;

pub fn consumer(config: &KafkaConfig, metrics: Arc<Metrics>) -> anyhow::Result<IngestConsumer> {
    let mut client = base(config);
    client
        .set("group.id", &config.group_id)
        .set("auto.offset.reset", "earliest")
        // Offsets are stored by hand once the letters they carried are in MongoDB; the
        // background commit then only ever commits durable work.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", config.session_timeout.as_millis().to_string())
        .set("queued.min.messages", "1000")
        .set("queued.max.messages.kbytes", "2048")
        .set("fetch.max.bytes", "4194304")
        .set("max.partition.fetch.bytes", "1048576")
        .set("receive.message.max.bytes", "4195328")
        .set("statistics.interval.ms", config.statistics_interval.as_millis().to_string());
    if let Some(instance) = &config.group_instance_id {
        client.set("group.instance.id", instance);
    }
    client
        .create_with_context(StatsContext { metrics, client: "consumer", sent: AtomicI64::new(0) })
        .context("creating the Kafka consumer")
}

/// Creates the topics that do not exist yet; the brokers we meet may not auto-create them.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = base(config).create().context("creating the Kafka admin client")?;
    let new_topics: Vec<NewTopic<'_>> =
        topics.iter().map(|name| NewTopic::new(name, config.partitions, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&new_topics, &options).await.context("creating Kafka topics")?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic = %topic, partitions = config.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Whether the brokers answer a metadata request (for readiness). Blocking in librdkafka, so it
/// runs off the async threads.
pub async fn reachable(producer: &StatusProducer, timeout: Duration) -> anyhow::Result<()> {
    use rdkafka::producer::Producer;
    let client = producer.clone();
    tokio::task::spawn_blocking(move || client.client().fetch_metadata(None, timeout).map(|_| ()))
        .await
        .context("metadata task")?
        .context("Kafka metadata request")
}
