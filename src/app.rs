//! Wires the stages together and runs them until the cancellation token fires, then shuts down
//! in order: stop consuming → finish in-flight sends (bounded) → store their outcomes →
//! release this instance's leases → flush the producer → exit.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context;
use futures::FutureExt as _;
use tokio::{
    net::TcpListener,
    sync::{Notify, Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{
    budget::{Budget, Plan},
    clock::Clock,
    config::Config,
    control::Control,
    deliverability::{Composer, suppression::Suppressions, topic::SuppressionTopic, unsubscribe::Signer},
    http::{self, HttpState},
    kafka::{self, IngestConsumer, StatusProducer},
    metrics::{Metrics, StatusLabel},
    pipeline::{
        dispatch::{Dispatcher, LeaseClock, Memory},
        ingest::Ingest,
        report::Report,
        send::{SendContext, Worker},
    },
    public::{self, PublicState},
    store::Store,
};

pub struct App {
    config: Config,
    store: Store,
    producer: StatusProducer,
    consumer: Arc<IngestConsumer>,
    listener: TcpListener,
    metrics: Arc<Metrics>,
    deliverability: Deliverability,
    control: Control,
}

/// What issue 11 adds, made at start-up so that a problem stops it.
struct Deliverability {
    composer: Arc<Composer>,
    /// The one-click endpoint's listener, when `PUBLIC_HTTP_ADDR` is set.
    public_listener: Option<TcpListener>,
    /// Reads `KAFKA_TOPIC_SUPPRESSIONS`, in a group of its own.
    suppression_consumer: rdkafka::consumer::StreamConsumer,
    /// The inbound SMTP listener for DSNs and ARF reports, when `FEEDBACK_SMTP_ADDR` is set.
    feedback_listener: Option<TcpListener>,
}

impl App {
    /// Connects to the dependencies, prepares the collection and topics, and binds the HTTP
    /// port. Fails with context when a dependency is unusable.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        tracing::info!(
            instance = %config.instance_id,
            brokers = %config.kafka.brokers,
            topic_in = %config.kafka.topic_in,
            topic_out = %config.kafka.topic_out,
            database = %config.mongo.database,
            collection = %config.mongo.collection,
            smtp = %config.smtp.relays.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            workers = config.smtp.max_senders,
            rate = %format!("{} per {}", config.smtp.rate_max_letters, humantime::format_duration(config.smtp.rate_period)),
            "starting mailsender"
        );
        // Test hook: `MAILSENDER_FAULT_INJECTION=clock_skew_ms:N` sets this host's clock N ms off.
        let mut skew_ms = 0;
        if let Some(skew) = config.fault_injection.as_deref().and_then(|i| i.strip_prefix("clock_skew_ms:")) {
            skew_ms = skew.parse().context("MAILSENDER_FAULT_INJECTION clock_skew_ms: not a number")?;
            tracing::warn!(skew_ms, "test hook: this process's wall clock is skewed");
        }
        // First, so a bad DKIM key stops the start before anything is connected.
        let composer = Arc::new(
            Composer::new(config.smtp.from.clone(), &config.deliverability)?
                .with_return_path(crate::feedback::return_path::ReturnPath::from_config(&config.feedback))
                .with_relay_metadata(crate::feedback::webhooks::Metadata::from_config(&config.feedback.webhooks)),
        );
        let metrics = Arc::new(Metrics::new());
        let store = Store::connect(&config.mongo, Clock::host(skew_ms), metrics.clone()).await?;
        retry_at_start("preparing MongoDB", || store.prepare(config.dispatch.lease)).await?;
        if config.kafka.create_topics {
            let topics = [
                config.kafka.topic_in.as_str(),
                config.kafka.topic_out.as_str(),
                config.kafka.topic_dlq.as_str(),
                config.deliverability.topic_suppressions.as_str(),
                config.deliverability.topic_unsubscribed.as_str(),
            ];
            let feedback = (config.feedback.smtp_addr.is_some() || config.feedback.webhooks.any())
                .then_some(config.feedback.topic.as_str());
            let topics: Vec<&str> = topics.into_iter().chain(feedback).collect();
            retry_at_start("creating Kafka topics", || kafka::ensure_topics(&config.kafka, &topics)).await?;
        }
        // Read before anything is claimed: a replica started while the deployment is paused
        // must not send a single letter.
        let control = Control::new(&store, metrics.clone());
        retry_at_start("reading the control document", || async { control.load().await.map(|_| ()) }).await?;
        let producer = kafka::producer(&config.kafka, metrics.clone())?;
        let consumer = Arc::new(kafka::consumer(&config.kafka, metrics.clone())?);
        let suppression_consumer =
            kafka::side_consumer(&config.kafka, &format!("{}-suppressions", config.kafka.group_id))?;
        let listener = TcpListener::bind(config.http.addr)
            .await
            .with_context(|| format!("binding HTTP_ADDR {}", config.http.addr))?;
        let public_listener = match config.deliverability.public_addr {
            Some(addr) => {
                Some(TcpListener::bind(addr).await.with_context(|| format!("binding PUBLIC_HTTP_ADDR {addr}"))?)
            }
            None => None,
        };
        let feedback_listener = crate::feedback::listener::bind(&config.feedback).await?;
        let deliverability = Deliverability { composer, public_listener, suppression_consumer, feedback_listener };
        Ok(App { config, store, producer, consumer, listener, metrics, deliverability, control })
    }

    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App { config, store, producer, consumer, listener, metrics, deliverability, control } = self;
        let Deliverability { composer, public_listener, suppression_consumer, feedback_listener } = deliverability;
        let suppressions = Suppressions::new(&store, config.deliverability.suppress_after_hard_bounces);
        // One owner per process start: a restarted process (same INSTANCE_ID) must not renew the
        // leases of letters its killed predecessor claimed; they expire and are reaped.
        let owner = format!("{}-{}", config.instance_id, &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let wake = Arc::new(Notify::new());
        let lease = Arc::new(LeaseClock::new(config.dispatch.lease, control.cancels()));
        let consumer_running = Arc::new(AtomicBool::new(false));
        let abort = CancellationToken::new();
        let background = CancellationToken::new();

        // One budget for every replica, in the letters' database (see `crate::budget`).
        let budget = Arc::new(Budget::with_clock(
            Plan::new(&config.smtp),
            Arc::new(store.ledger()),
            store.clock().clone(),
            metrics.clone(),
        ));
        tracing::info!(
            budget = %budget.plan().rate_label,
            quotas = %config.smtp.quotas.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            unit = ?config.smtp.rate_unit,
            paced_per_s = budget.plan().rate(),
            "sending budget shared through MongoDB"
        );
        let posts = http::PostDoor::new(&config, &store, metrics.clone())?;
        retry_at_start("preparing the Idempotency-Key collection", || posts.keys.prepare()).await?;
        // Before the HTTP state, whose readiness shows the relays' breakers.
        let mut send_context = SendContext {
            composer,
            ..SendContext::new(&config.smtp, config.dispatch.clone(), lease.clone(), budget.clone(), metrics.clone())?
        };
        send_context.paused = control.flag();
        let send_context = Arc::new(send_context);
        let http_state = Arc::new(HttpState {
            producer: producer.clone(),
            store: store.clone(),
            topic_in: config.kafka.topic_in.clone(),
            relays: send_context.relays.clone(),
            admin_token: config.http.admin_token.clone(),
            admin_networks: config.http.admin_networks.clone(),
            control: control.clone(),
            instance_id: config.instance_id.clone(),
            // Also the report stage's, below.
            report: Report {
                store: store.clone(),
                producer: producer.clone(),
                topic: config.kafka.topic_out.clone(),
                owner: owner.clone(),
                metrics: metrics.clone(),
                body_max: config.kafka.status_body_max_bytes,
                suppressions: suppressions.clone(),
            },
            metrics: metrics.clone(),
            consumer_running: consumer_running.clone(),
            shutdown: shutdown.clone(),
            readiness: Default::default(),
            budget: budget.clone(),
            posts,
        });
        let reporter = http_state.report.clone();
        tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
        let http_stop = CancellationToken::new();
        let http = tokio::spawn(
            axum::serve(
                listener,
                // The peer address is what the admin routes' network check looks at.
                http::router(http_state, config.http.max_body_bytes)
                    .into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(http_stop.clone().cancelled_owned())
            .into_future(),
        );

        let webhooks =
            crate::feedback::webhooks::state(&config, &store, suppressions.clone(), producer.clone(), metrics.clone())?;
        let public = match public_listener {
            Some(listener) => {
                let mut router = axum::Router::new();
                if let (Some(template), Some(secret)) =
                    (&config.deliverability.unsubscribe_url, &config.deliverability.unsubscribe_secret)
                {
                    router = public::router(Arc::new(PublicState {
                        template: template.clone(),
                        signer: Signer::new(secret),
                        suppressions: suppressions.clone(),
                        producer: producer.clone(),
                        topic: config.deliverability.topic_unsubscribed.clone(),
                        store: store.clone(),
                        events: store.unsubscribed(),
                        publish_lease: config.kafka.message_timeout + Duration::from_secs(10),
                    }));
                    tracing::info!(addr = %listener.local_addr()?, "one-click unsubscribe endpoint listening");
                }
                // Its routes take precedence over the one-click endpoint's catch-all.
                if let Some(webhooks) = webhooks {
                    router = router.merge(crate::feedback::webhooks::router(webhooks));
                    tracing::info!(addr = %listener.local_addr()?, "relay webhooks listening");
                }
                Some(tokio::spawn(
                    axum::serve(listener, router)
                        .with_graceful_shutdown(http_stop.clone().cancelled_owned())
                        .into_future(),
                ))
            }
            None => None,
        };

        // Stops taking reports when shutdown starts; a session cut short answers 421 or 451,
        // and the sending MTA delivers its report again.
        if let Some(listener) = feedback_listener {
            let (suppressions, metrics) = (suppressions.clone(), metrics.clone());
            let producer = producer.clone();
            crate::feedback::listener::start(
                listener,
                &config,
                &store,
                suppressions,
                producer,
                metrics,
                shutdown.clone(),
            );
        }

        let mut ingest = tokio::spawn(
            Ingest {
                consumer,
                producer: producer.clone(),
                store: store.clone(),
                config: config.kafka.clone(),
                metrics: metrics.clone(),
                wake: wake.clone(),
                running: consumer_running,
            }
            .run(shutdown.clone()),
        );

        let workers_count = config.smtp.max_senders;
        let rate = config.smtp.rate_max_letters as f64 / config.smtp.rate_period.as_secs_f64();
        let capacity = Dispatcher::capacity(&config.dispatch, workers_count, rate);
        let (letters_tx, letters_rx) = async_channel::bounded(workers_count);
        let (outcomes_tx, outcomes_rx) = mpsc::channel(512);
        // Every stage below runs supervised: one that ends or panics outside shutdown starts the
        // shutdown (which releases what this instance holds) and makes the process exit non-zero,
        // so Kubernetes restarts it instead of leaving a live pod that moves no letter.
        let failures = Failures::new(config.fault_injection.clone());
        let dispatcher = tokio::spawn(
            failures.supervise(
                "dispatcher",
                &shutdown,
                Dispatcher {
                    store: store.clone(),
                    config: config.dispatch.clone(),
                    owner: owner.clone(),
                    control: control.clone(),
                    capacity: Arc::new(Semaphore::new(capacity)),
                    wake,
                    lease: lease.clone(),
                    low_water: Dispatcher::low_water(&config.dispatch, capacity),
                    memory: Memory::new(config.dispatch.max_bytes),
                    suppressions: suppressions.clone(),
                }
                .run(letters_tx, shutdown.clone()),
            ),
        );
        let mut workers = JoinSet::new();
        for id in 0..workers_count {
            let worker = Worker::new(id, send_context.clone());
            workers.spawn(failures.supervise(
                "an SMTP worker",
                &shutdown,
                worker.run(letters_rx.clone(), outcomes_tx.clone(), shutdown.clone(), abort.clone()),
            ));
        }
        drop((letters_rx, outcomes_tx));

        // The report stage ends when every worker is gone, which only happens at shutdown.
        let report =
            tokio::spawn(failures.supervise("report", &shutdown, reporter.clone().run(outcomes_rx, shutdown.clone())));
        let mut chores = JoinSet::new();
        // Chores run until `background` fires, after the workers; ending before is a failure.
        chores.spawn(failures.supervise_until(
            "the republisher",
            &background,
            &shutdown,
            reporter.republish(
                config.dispatch.republish_interval,
                config.dispatch.republish_batch,
                config.kafka.message_timeout + Duration::from_secs(15),
                background.clone(),
            ),
        ));
        chores.spawn(failures.supervise_until(
            "lease maintenance",
            &background,
            &shutdown,
            Dispatcher::maintain(store.clone(), config.dispatch.clone(), owner.clone(), lease, background.clone()),
        ));
        chores.spawn(failures.supervise_until(
            "retention",
            &background,
            &shutdown,
            crate::retention::run(
                store.clone(),
                owner.clone(),
                config.dispatch.retention,
                config.dispatch.retention_interval,
                background.clone(),
            ),
        ));
        chores.spawn(
            failures.supervise_until(
                "the suppression topic",
                &background,
                &shutdown,
                SuppressionTopic {
                    consumer: suppression_consumer,
                    topic: config.deliverability.topic_suppressions.clone(),
                    topic_dlq: config.kafka.topic_dlq.clone(),
                    suppressions: suppressions.clone(),
                    producer: producer.clone(),
                }
                .run(background.clone()),
            ),
        );
        chores.spawn(failures.supervise_until(
            "the control watch",
            &background,
            &shutdown,
            control.watch(background.clone()),
        ));
        chores.spawn(failures.supervise_until(
            "the status gauge",
            &background,
            &shutdown,
            refresh_status_gauge(store.clone(), metrics.clone(), background.clone()),
        ));

        // Ingest ending on its own is a failure; ending because shutdown was requested is not.
        // `biased` and the re-check matter: on one thread, both can be ready at the same poll.
        let early = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            result = &mut ingest => Some(result),
        };
        let ended_early = early.is_some() && !shutdown.is_cancelled();
        if ended_early {
            shutdown.cancel();
        }
        tracing::info!(
            timeout_s = config.shutdown_timeout.as_secs_f64(),
            "shutting down: consumption stops, in-flight sends finish"
        );
        let ingest_result = match early {
            Some(result) => result,
            None => ingest.await,
        };
        let failure = match ingest_result {
            Ok(Ok(())) if ended_early => Some(anyhow::anyhow!("ingest stopped unexpectedly")),
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.context("ingest failed")),
            Err(error) => Some(anyhow::Error::new(error).context("ingest panicked")),
        };
        let _ = dispatcher.await;
        let finished =
            tokio::time::timeout(config.shutdown_timeout, async { while workers.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!("in-flight sends did not finish within SHUTDOWN_TIMEOUT; abandoning them");
            abort.cancel();
            while workers.join_next().await.is_some() {}
        }
        // The units this replica will not use now go to the replicas that stay (a rolling update).
        let _ = tokio::time::timeout(Duration::from_secs(2), send_context.limiter.budget().give_back()).await;
        // Every worker is gone, so the outcome channel is closed: this returns once the last
        // outcome is written.
        let _ = report.await;
        background.cancel();
        while chores.join_next().await.is_some() {}
        let failure = failure.or_else(|| failures.first());

        match store.release_all(&owner).await {
            Ok(released) => tracing::info!(released, "returned this instance's unsent letters to awaiting"),
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                "releasing letters failed; their leases will expire instead"
            ),
        }
        if let Err(error) = producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %error, "producer flush at shutdown");
        }
        producer.close();
        http_stop.cancel();
        let _ = http.await;
        if let Some(public) = public {
            let _ = public.await;
        }
        tracing::info!("mailsender stopped");
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Stages that ended when they should not have; see [`Failures::supervise`].
#[derive(Clone)]
struct Failures {
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    /// `MAILSENDER_FAULT_INJECTION=panic:STAGE`: that stage panics a second after it starts. For
    /// the tests that prove a failing stage ends the process; never set in production.
    inject: Option<String>,
}

impl Failures {
    fn new(inject: Option<String>) -> Failures {
        Failures { seen: Arc::default(), inject }
    }

    /// Runs a stage that should run until `shutdown`.
    fn supervise<F>(
        &self,
        name: &'static str,
        shutdown: &CancellationToken,
        stage: F,
    ) -> impl Future<Output = ()> + use<F>
    where
        F: Future<Output = ()>,
    {
        self.supervise_until(name, shutdown, shutdown, stage)
    }

    /// Runs a stage that should run until `until`; if it ends or panics before, records why and
    /// cancels `shutdown`.
    fn supervise_until<F>(
        &self,
        name: &'static str,
        until: &CancellationToken,
        shutdown: &CancellationToken,
        stage: F,
    ) -> impl Future<Output = ()> + use<F>
    where
        F: Future<Output = ()>,
    {
        let (failures, until, shutdown) = (self.clone(), until.clone(), shutdown.clone());
        let inject = self.inject.as_deref().and_then(|i| i.strip_prefix("panic:")).is_some_and(|s| name.contains(s));
        async move {
            let stage = async move {
                if inject {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    panic!("fault injected into {name}");
                }
                stage.await
            };
            let result = std::panic::AssertUnwindSafe(stage).catch_unwind().await;
            let why = match result {
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_owned());
                    format!("{name} panicked: {message}")
                }
                Ok(()) if !until.is_cancelled() => format!("{name} stopped unexpectedly"),
                Ok(()) => return,
            };
            tracing::error!(stage = name, reason = %why, "a stage failed; shutting down");
            failures.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(why);
            shutdown.cancel();
        }
    }

    fn first(&self) -> Option<anyhow::Error> {
        let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.first().map(|why| anyhow::anyhow!("{why}"))
    }
}

/// Dependencies may start after us (a fresh cluster, the local stack): retry for a while
/// before giving up, so start-up order does not matter.
async fn retry_at_start<F, Fut>(what: &str, mut operation: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match operation().await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < 6 => {
                tracing::warn!(error = format!("{error:#}"), attempt, "{what} failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(error) => return Err(error.context(format!("{what} failed after {attempt} attempts"))),
        }
    }
}

/// Keeps the letters-by-status gauge current with one aggregation every 15 s, so scrapes cost
/// nothing.
async fn refresh_status_gauge(store: Store, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(15));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match store.count_by_status().await {
            Ok(counts) => {
                for status in ["awaiting", "processing", "sent", "error"] {
                    let n = counts.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
                    metrics.by_status.get_or_create(&StatusLabel { status: status.to_owned() }).set(n);
                }
            }
            Err(error) => tracing::debug!(error = format!("{error:#}"), "counting letters by status failed"),
        }
    }
}
