//! Kafka client set-up shared by the stages: producer, consumer and topic creation.
//!
//! librdkafka's defaults are sized for large brokers and machines (a consumer may prefetch up to
//! 64 MiB per partition); the values here bound memory to a few MiB, which is plenty for a
//! service whose throughput is capped by SMTP.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use rdkafka::{
    ClientConfig, ClientContext,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{ConsumerContext, Rebalance, StreamConsumer},
    error::{KafkaError, KafkaResult},
    message::{DeliveryResult, OwnedHeaders},
    producer::{BaseProducer, BaseRecord, Producer, ProducerContext},
    types::RDKafkaErrorCode,
};
use tokio::sync::oneshot;

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

/// The producer every stage shares: status messages, dead letters, posted batches.
///
/// It works like rdkafka's `FutureProducer` (each send resolves once the broker acknowledged it)
/// but is polled by its own thread with a one-second timeout. `FutureProducer` polls every
/// 100 ms, and rdkafka 0.39 rounds the remaining poll time down to whole milliseconds, so it
/// spins through the last millisecond of every poll: about 1 % of a core while idle.
#[derive(Clone)]
pub struct StatusProducer {
    inner: Arc<ProducerInner>,
}

struct ProducerInner {
    producer: BaseProducer<StatsContext>,
    stop: AtomicBool,
}

pub type Acknowledgement = oneshot::Sender<Delivery>;

/// What librdkafka reported for one message.
pub type Delivery = Result<(), Undelivered>;

/// A message librdkafka gave up on, and whether the broker may have written it all the same.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct Undelivered {
    pub error: KafkaError,
    /// False only when librdkafka knows the broker never had it (it was never sent, or the broker
    /// refused it): a timeout while a request was in flight leaves the message possibly written.
    pub possibly_persisted: bool,
}

impl Undelivered {
    fn local(error: KafkaError) -> Undelivered {
        Undelivered { error, possibly_persisted: false }
    }
}

pub fn producer(config: &KafkaConfig, metrics: Arc<Metrics>) -> anyhow::Result<StatusProducer> {
    // Undelivered status messages stay `unreported` in MongoDB and are republished later, so the
    // producer need not hold them for long during a broker outage.
    build_producer(config, config.message_timeout, metrics, "kafka-producer-poll")
}

/// The producer of `POST /post`'s batches. Its messages time out after `wait`, the time the
/// request waits: with the shared producer's longer timeout, a batch the request gave up on stayed
/// queued and was produced once the broker came back, after the client had been told `503` and
/// had retried (every recipient got the campaign twice). Now the delivery report comes within
/// the wait, and a failure it reports is final.
pub fn post_producer(config: &KafkaConfig, wait: Duration, metrics: Arc<Metrics>) -> anyhow::Result<StatusProducer> {
    build_producer(config, wait, metrics, "kafka-post-poll")
}

fn build_producer(
    config: &KafkaConfig,
    message_timeout: Duration,
    metrics: Arc<Metrics>,
    thread: &str,
) -> anyhow::Result<StatusProducer> {
    // The broker's own bound on an acknowledgement (librdkafka's default is 30 s); librdkafka
    // times a request in flight out by its first message's timeout, so this only keeps the
    // broker from waiting longer than the message may.
    let request_timeout = message_timeout.min(Duration::from_secs(30));
    let producer: BaseProducer<StatsContext> = base(config)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", message_timeout.as_millis().to_string())
        .set("request.timeout.ms", request_timeout.as_millis().to_string())
        .set("queue.buffering.max.kbytes", "8192")
        .set("message.max.bytes", "2097152")
        .set("statistics.interval.ms", config.statistics_interval.as_millis().to_string())
        .create_with_context(StatsContext::new(metrics, "producer", config.stall_warning))
        .context("creating the Kafka producer")?;
    let inner = Arc::new(ProducerInner { producer, stop: AtomicBool::new(false) });
    // Weak, so that a producer whose every handle is dropped (the HTTP state's, at the end of a
    // run) stops its thread without an explicit `close`.
    let polled = Arc::downgrade(&inner);
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            while let Some(inner) = polled.upgrade() {
                if inner.stop.load(Ordering::Relaxed) {
                    break;
                }
                inner.producer.poll(Duration::from_secs(1));
            }
        })
        .context("starting the producer's polling thread")?;
    Ok(StatusProducer { inner })
}

impl StatusProducer {
    /// Queues a message and waits for the broker's acknowledgement (or librdkafka's final
    /// failure after the producer's message timeout). A full local queue fails at once.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> KafkaResult<()> {
        self.deliver(topic, key, payload, headers).await.map_err(|undelivered| undelivered.error)
    }

    /// As [`send`](Self::send), saying on failure whether the broker may have the message.
    pub async fn deliver(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Delivery {
        let (acknowledged, acknowledgement) = oneshot::channel();
        let mut record = BaseRecord::<[u8], [u8], Box<Acknowledgement>>::with_opaque_to(topic, Box::new(acknowledged))
            .payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        self.inner.producer.send(record).map_err(|(error, _)| Undelivered::local(error))?;
        // A dropped sender means librdkafka discarded the message unreported (a purge at
        // shutdown): whether it went out is unknown.
        acknowledgement.await.unwrap_or(Err(Undelivered { error: KafkaError::Canceled, possibly_persisted: true }))
    }

    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.inner.producer.flush(timeout)
    }

    /// Stops the polling thread (within a second); call after the final flush.
    pub fn close(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
    }

    fn client(&self) -> &rdkafka::client::Client<StatsContext> {
        self.inner.producer.client()
    }
}

/// Turns librdkafka's statistics into metrics: requests sent (a cumulative total in each
/// report, turned into counter increments) and, for the consumer, lag per partition.
pub struct StatsContext {
    pub metrics: Arc<Metrics>,
    pub client: &'static str,
    sent: AtomicI64,
    /// Per partition: the consumer's position and since when it has not moved while messages wait.
    positions: Mutex<HashMap<i32, (i64, Instant)>>,
    stall_warning: Duration,
}

impl StatsContext {
    fn new(metrics: Arc<Metrics>, client: &'static str, stall_warning: Duration) -> StatsContext {
        StatsContext { metrics, client, sent: AtomicI64::new(0), positions: Mutex::default(), stall_warning }
    }

    /// A partition whose position has not moved for `stall_warning` while messages wait behind it
    /// is stalled: a message that cannot be fetched, or ingest stuck. It shows in a gauge and a
    /// warning, once per stall.
    fn watch_position(&self, partition: i32, position: i64, lag: i64) {
        let mut positions = self.positions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let entry = positions.entry(partition).or_insert((position, now));
        if entry.0 != position || lag <= 0 {
            *entry = (position, now);
        }
        let stalled_for = now.saturating_duration_since(entry.1);
        let stalled = lag > 0 && stalled_for >= self.stall_warning;
        let gauge = self.metrics.partition_stalled.get_or_create(&PartitionLabel { partition: partition.to_string() });
        if stalled && gauge.get() == 0 {
            tracing::warn!(
                partition,
                position,
                waiting = lag,
                stalled_s = stalled_for.as_secs(),
                "input partition stalled: its position has not moved while messages wait"
            );
        }
        gauge.set(i64::from(stalled));
    }
}

/// The part of librdkafka's statistics the metrics read. rdkafka's own `Statistics` decodes the
/// whole report (every broker's latency windows and request counts, every topic's batch sizes)
/// into maps of owned strings, to be dropped at once; this reads the few numbers used and skips
/// the rest without building it (issue 23: the statistics were a tenth of an idle replica's work).
#[derive(serde::Deserialize)]
struct Report {
    /// Requests sent to the brokers, since the client started.
    #[serde(default)]
    tx: i64,
    #[serde(default)]
    topics: HashMap<String, TopicReport>,
}

#[derive(serde::Deserialize)]
struct TopicReport {
    #[serde(default)]
    partitions: HashMap<i32, PartitionReport>,
}

#[derive(serde::Deserialize)]
struct PartitionReport {
    #[serde(default)]
    fetch_state: String,
    #[serde(default = "unknown")]
    app_offset: i64,
    #[serde(default = "unknown")]
    consumer_lag: i64,
}

/// librdkafka's "not known" for offsets and lag.
fn unknown() -> i64 {
    -1
}

impl StatsContext {
    fn report(&self, report: &Report) {
        let before = self.sent.swap(report.tx, Ordering::Relaxed);
        if report.tx > before {
            self.metrics
                .kafka_requests
                .get_or_create(&ClientLabel { client: self.client })
                .inc_by((report.tx - before) as u64);
        }
        for topic in report.topics.values() {
            for (partition, stats) in &topic.partitions {
                // librdkafka keeps reporting a partition it no longer fetches (given away in a
                // rebalance) with its last lag; that one is another replica's to report.
                if matches!(stats.fetch_state.as_str(), "none" | "stopped") {
                    continue;
                }
                if *partition >= 0 && stats.consumer_lag >= 0 {
                    let label = PartitionLabel { partition: partition.to_string() };
                    self.metrics.consumer_lag.get_or_create(&label).set(stats.consumer_lag);
                }
                if self.client == "consumer" && *partition >= 0 && stats.app_offset >= 0 {
                    self.watch_position(*partition, stats.app_offset, stats.consumer_lag);
                }
            }
        }
    }
}

impl ClientContext for StatsContext {
    fn stats_raw(&self, statistics: &[u8]) {
        match serde_json::from_slice::<Report>(statistics) {
            Ok(report) => self.report(&report),
            Err(error) => {
                tracing::warn!(error = %error, client = self.client, "librdkafka's statistics cannot be read")
            }
        }
    }
}

impl ProducerContext for StatsContext {
    type DeliveryOpaque = Box<Acknowledgement>;

    fn delivery(&self, result: &DeliveryResult<'_>, acknowledged: Self::DeliveryOpaque) {
        let delivery = result.as_ref().map(|_| ()).map_err(|(error, message)| {
            // SAFETY: `message` is the delivery report's message, valid for this callback;
            // `rd_kafka_message_status` only reads its status field.
            let status = unsafe { rdkafka::bindings::rd_kafka_message_status(message.ptr()) };
            Undelivered {
                error: error.clone(),
                possibly_persisted: status
                    != rdkafka::bindings::rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED,
            }
        });
        // The sender may be gone (its request timed out); nothing is waiting then.
        let _ = acknowledged.send(delivery);
    }
}

/// Logs rebalances and failed commits.
impl ConsumerContext for StatsContext {
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => tracing::info!(partitions = partitions.count(), "partitions assigned"),
            Rebalance::Revoke(partitions) => {
                tracing::info!(partitions = partitions.count(), "partitions revoked");
                // Their lag and stall are now another replica's to report; a last value kept
                // here would keep an alert firing for a partition this replica no longer reads.
                let mut positions = self.positions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for element in partitions.elements() {
                    let label = PartitionLabel { partition: element.partition().to_string() };
                    self.metrics.consumer_lag.remove(&label);
                    self.metrics.partition_stalled.remove(&label);
                    positions.remove(&element.partition());
                }
            }
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
        // A message larger than the partition's fetch size is still handed over alone (KIP-74),
        // but only within the response limits: these two bound the largest message ingest can
        // ever read, and a smaller bound would stop its partition for good. Some brokers (tansu)
        // apply `fetch.max.bytes` strictly. Memory is only taken when such a message comes: the
        // partition fetch size keeps ordinary responses small.
        .set("max.partition.fetch.bytes", "1048576")
        .set("fetch.max.bytes", config.max_message_bytes.to_string())
        .set("receive.message.max.bytes", (config.max_message_bytes + (1 << 20)).to_string())
        .set("statistics.interval.ms", config.statistics_interval.as_millis().to_string())
        // Some brokers (tansu among them) hold a fetch for its whole wait even when data is
        // there, so the wait is the floor of ingest latency: 100 ms by default instead of 500.
        .set("fetch.wait.max.ms", config.fetch_wait.as_millis().to_string());
    if let Some(instance) = &config.group_instance_id {
        client.set("group.instance.id", instance);
    }
    client
        .create_with_context(StatsContext::new(metrics, "consumer", config.stall_warning))
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
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout).map(|_| ()))
        .await
        .context("metadata task")?
        .context("Kafka metadata request")
}

/// A consumer of a side topic (the suppression list's) in its own group, its offsets stored by
/// hand once what a message carried is durable, as ingest does.
pub fn side_consumer(config: &KafkaConfig, group_id: &str) -> anyhow::Result<StreamConsumer> {
    base(config)
        .set("group.id", group_id)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", config.session_timeout.as_millis().to_string())
        .set("fetch.wait.max.ms", config.fetch_wait.as_millis().to_string())
        .create()
        .with_context(|| format!("creating the Kafka consumer of group {group_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer's report as librdkafka 2.12 writes it, cut to one broker and one topic; the
    /// windows and request counts the metrics do not read are there to be skipped.
    fn report(tx: i64, lag: i64, app_offset: i64) -> String {
        let window = r#"{"min":0,"max":0,"avg":0,"sum":0,"stddev":0,"p50":0,"p75":0,"p90":0,"p95":0,"p99":0,"p99_99":0,"outofrange":0,"hdrsize":0,"cnt":0}"#;
        format!(
            r#"{{"name":"mailsender#consumer-1","client_id":"mailsender","type":"consumer","ts":1,"time":2,"age":3,
            "replyq":0,"msg_cnt":0,"msg_size":0,"msg_max":100000,"msg_size_max":1073741824,"simple_cnt":0,
            "metadata_cache_cnt":1,"tx":{tx},"tx_bytes":1000,"rx":{tx},"rx_bytes":2000,"txmsgs":0,"txmsg_bytes":0,
            "rxmsgs":5,"rxmsg_bytes":500,
            "brokers":{{"127.0.0.1:9092/1":{{"name":"127.0.0.1:9092/1","nodeid":1,"nodename":"127.0.0.1:9092",
              "source":"configured","state":"UP","stateage":1,"outbuf_cnt":0,"outbuf_msg_cnt":0,"waitresp_cnt":1,
              "waitresp_msg_cnt":0,"tx":{tx},"txbytes":1,"txerrs":0,"txretries":0,"txidle":1,"req_timeouts":0,
              "rx":1,"rxbytes":1,"rxerrs":0,"rxcorriderrs":0,"rxpartial":0,"rxidle":1,"zbuf_grow":0,
              "buf_grow":0,"wakeups":1,"connects":1,"disconnects":0,
              "int_latency":{window},"outbuf_latency":{window},"rtt":{window},"throttle":{window},
              "req":{{"Fetch":3,"Offset":0,"Metadata":2,"OffsetCommit":1,"Heartbeat":4,"JoinGroup":1}},
              "toppars":{{"in-0":{{"topic":"in","partition":0}}}}}}}},
            "topics":{{"in":{{"topic":"in","age":1,"metadata_age":1,"batchsize":{window},"batchcnt":{window},
              "partitions":{{
                "0":{{"partition":0,"broker":1,"leader":1,"desired":true,"unknown":false,"fetch_state":"active",
                     "query_offset":-1001,"next_offset":10,"app_offset":{app_offset},"stored_offset":{app_offset},
                     "committed_offset":{app_offset},"eof_offset":-1001,"lo_offset":0,"hi_offset":12,
                     "ls_offset":12,"consumer_lag":{lag},"consumer_lag_stored":{lag},"txmsgs":0,"rxmsgs":5}},
                "1":{{"partition":1,"broker":1,"leader":1,"desired":false,"fetch_state":"stopped",
                     "app_offset":3,"consumer_lag":7}},
                "-1":{{"partition":-1,"broker":-1,"leader":-1,"fetch_state":"none","app_offset":-1001,
                      "consumer_lag":-1}}}}}}}},
            "cgrp":{{"state":"up","stateage":1,"join_state":"steady","rebalance_age":1,"rebalance_cnt":1,
              "rebalance_reason":"","assignment_size":1}}}}"#
        )
    }

    #[test]
    fn statistics_give_requests_lag_and_stalls() {
        let metrics = Arc::new(Metrics::new());
        let context = StatsContext::new(metrics.clone(), "consumer", Duration::ZERO);
        let lag =
            |partition: &str| metrics.consumer_lag.get_or_create(&PartitionLabel { partition: partition.into() }).get();
        let requests = || metrics.kafka_requests.get_or_create(&ClientLabel { client: "consumer" }).get();

        context.stats_raw(report(11, 2, 10).as_bytes());
        assert_eq!(requests(), 11);
        assert_eq!(lag("0"), 2);
        // Given away (stopped) and the internal partition: not this replica's to report.
        assert!(metrics.consumer_lag.get(&PartitionLabel { partition: "1".into() }).is_none());
        assert!(metrics.consumer_lag.get(&PartitionLabel { partition: "-1".into() }).is_none());

        // The next report: the requests since, the new lag; the position did not move while
        // messages wait, so (with no grace) the partition is stalled.
        context.stats_raw(report(15, 3, 10).as_bytes());
        assert_eq!(requests(), 15);
        assert_eq!(lag("0"), 3);
        assert_eq!(metrics.partition_stalled.get_or_create(&PartitionLabel { partition: "0".into() }).get(), 1);

        // A report that cannot be read changes nothing.
        context.stats_raw(b"{\"tx\": \"many\"");
        assert_eq!(requests(), 15);
        assert_eq!(lag("0"), 3);
    }
}
