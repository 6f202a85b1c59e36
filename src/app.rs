//! Wires the stages together and runs them until the cancellation token fires, then shuts down
//! in order: stop consuming → finish in-flight sends (bounded) → store their outcomes →
//! release this instance's leases → flush the producer → exit. [`App::run`] reads as that order;
//! the stages' construction from `&Config` is below it.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context;
use futures::FutureExt as _;
use tokio::{
    net::TcpListener,
    sync::{Notify, Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    budget::{Budget, Plan},
    chore::chore,
    clock::Clock,
    config::Config,
    control::Control,
    deliverability::{Composer, suppression::Suppressions, topic::SuppressionTopic, unsubscribe::Signer},
    http::{
        admin::{self, HttpState, PostDoor},
        public::{self, PublicState},
    },
    kafka::{self, IngestConsumer, StatusProducer},
    metrics::{Metrics, StatusLabel},
    pipeline::{
        dispatch::{Dispatcher, Express, LeaseClock, Memory},
        ingest::Ingest,
        queue::LaneQueue,
        report::Report,
        send::{SendContext, Worker},
    },
    priority::Fairness,
    store::Store,
};

pub struct App {
    config: Config,
    store: Store,
    producer: StatusProducer,
    consumer: Arc<IngestConsumer>,
    /// Reads `KAFKA_TOPIC_SUPPRESSIONS`, in a group of its own.
    suppression_consumer: rdkafka::consumer::StreamConsumer,
    listeners: Listeners,
    metrics: Arc<Metrics>,
    composer: Arc<Composer>,
    control: Control,
}

/// The ports, bound at start-up so that a taken one stops it.
struct Listeners {
    admin: TcpListener,
    /// The one-click endpoint's listener, when `PUBLIC_HTTP_ADDR` is set.
    public: Option<TcpListener>,
    /// The inbound SMTP listener for DSNs and ARF reports, when `FEEDBACK_SMTP_ADDR` is set.
    feedback: Option<TcpListener>,
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
        if config.smtp.sandbox {
            tracing::warn!(
                simulator = crate::feedback::sandbox::DOMAIN,
                "SMTP_SANDBOX is on: letters are marked sent but handed to no relay"
            );
        }
        // Test hook: `MAILSENDER_FAULT_INJECTION=clock_skew_ms:N` sets this host's clock N ms off.
        let mut skew_ms = 0;
        if let Some(skew) = config.fault_injection.as_deref().and_then(|i| i.strip_prefix("clock_skew_ms:")) {
            skew_ms = skew.parse().context("MAILSENDER_FAULT_INJECTION clock_skew_ms: not a number")?;
            tracing::warn!(skew_ms, "test hook: this process's wall clock is skewed");
        }
        // First, so a bad DKIM key or link template stops the start before anything is connected.
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
            let feedback =
                (config.feedback.smtp_addr.is_some() || config.feedback.webhooks.any() || config.smtp.sandbox)
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
        let admin = TcpListener::bind(config.http.addr)
            .await
            .with_context(|| format!("binding HTTP_ADDR {}", config.http.addr))?;
        let public = match config.deliverability.public_addr {
            Some(addr) => {
                Some(TcpListener::bind(addr).await.with_context(|| format!("binding PUBLIC_HTTP_ADDR {addr}"))?)
            }
            None => None,
        };
        let feedback = crate::feedback::listener::bind(&config.feedback).await?;
        let listeners = Listeners { admin, public, feedback };
        Ok(App { config, store, producer, consumer, suppression_consumer, listeners, metrics, composer, control })
    }

    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listeners.admin.local_addr()?)
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App { config, store, producer, consumer, suppression_consumer, listeners, metrics, composer, control } =
            self;
        let shared = Shared::new(&config, store, producer, metrics, control);
        let (lease, budget, metrics, paused) =
            (shared.lease.clone(), shared.budget.clone(), shared.metrics.clone(), shared.control.flag());
        let send =
            Arc::new(SendContext::new(&config.smtp, config.retry.clone(), lease, budget, metrics, composer, paused)?);
        // In the sandbox, the report stage hands stored outcomes to the simulator's mailbox.
        let (simulator, mailbox) = shared.sandbox(&config).unzip();
        // Before the HTTP state, which publishes the status messages of letters an operator cancels.
        let report = shared.report(&config, simulator);
        let posts = PostDoor::new(&config, &shared.store, shared.metrics.clone())?;
        retry_at_start("preparing the Idempotency-Key collection", || posts.keys.prepare()).await?;
        let consuming = Arc::new(AtomicBool::new(false));
        let admin_state = shared.admin_state(&config, &report, &send, &consuming, &shutdown, posts);
        // The listeners stop last: readiness and /metrics answer while everything else winds down.
        let listeners_stop = CancellationToken::new();
        let admin = serve_admin(listeners.admin, admin_state, config.http.max_body_bytes, &listeners_stop)?;
        let public = match listeners.public {
            Some(listener) => {
                let one_click = match send.composer.unsubscribe_template() {
                    Some(template) => Some(shared.public_state(&config, template)?),
                    None => None,
                };
                let webhooks = crate::feedback::webhooks::state(
                    &config,
                    &shared.store,
                    shared.suppressions.clone(),
                    shared.producer.clone(),
                    shared.metrics.clone(),
                )?;
                Some(serve_public(listener, one_click, webhooks, &listeners_stop)?)
            }
            None => None,
        };
        if let Some(listener) = listeners.feedback {
            shared.serve_feedback(&config, listener, &shutdown);
        }

        // Every stage below runs supervised: see [`Supervisor`].
        let supervisor = Supervisor::new(&config, &shutdown);
        let wakes = Wakes { wake: Arc::new(Notify::new()), express: Arc::new(Notify::new()) };
        let ingest = tokio::spawn(shared.ingest(&config, consumer, &wakes, consuming).run(shutdown.clone()));
        let letters_rx = Arc::new(LaneQueue::new(config.dispatch.bulk_share, shared.fairness.clone()));
        let (outcomes_tx, outcomes_rx) = mpsc::channel(512);
        let dispatcher = shared.dispatcher(&config, wakes);
        let dispatcher =
            supervisor.spawn("dispatcher", &shutdown, dispatcher.run(letters_rx.clone(), shutdown.clone()));
        let (workers, abort) = (TaskTracker::new(), CancellationToken::new());
        for id in 0..config.smtp.max_senders {
            let worker = Worker::new(id, send.clone());
            let work = worker.run(letters_rx.clone(), outcomes_tx.clone(), shutdown.clone(), abort.clone());
            workers.spawn(supervisor.watch("an SMTP worker", &shutdown, work));
        }
        workers.close();
        drop((letters_rx, outcomes_tx));
        // The report stage ends when every worker is gone, which only happens at shutdown.
        let report_stage = supervisor.spawn("report", &shutdown, report.clone().run(outcomes_rx, shutdown.clone()));
        // The chores run until `background` fires, after the workers and the report stage.
        let background = CancellationToken::new();
        let chores = shared.chores(&config, report, suppression_consumer, mailbox, &supervisor, &background);

        let ingest_failure = until_shutdown(ingest, &shutdown).await;
        tracing::info!(
            timeout_s = config.shutdown_timeout.as_secs_f64(),
            "shutting down: consumption stops, in-flight sends finish"
        );
        let _ = dispatcher.await;
        if tokio::time::timeout(config.shutdown_timeout, workers.wait()).await.is_err() {
            tracing::warn!("in-flight sends did not finish within SHUTDOWN_TIMEOUT; abandoning them");
            abort.cancel();
            workers.wait().await;
        }
        // The units this replica will not use now go to the replicas that stay (a rolling update).
        let _ = tokio::time::timeout(Duration::from_secs(2), shared.budget.give_back()).await;
        // Every worker is gone, so the outcome channel is closed: this returns once the last
        // outcome is written.
        let _ = report_stage.await;
        background.cancel();
        chores.wait().await;
        shared.release_leases().await;
        if let Err(error) = shared.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %error, "producer flush at shutdown");
        }
        shared.producer.close();
        listeners_stop.cancel();
        let _ = admin.await;
        if let Some(public) = public {
            let _ = public.await;
        }
        tracing::info!("mailsender stopped");
        match ingest_failure.or_else(|| supervisor.failure()) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Waits for the shutdown, or for ingest to end, which outside shutdown is a failure (and starts
/// the shutdown).
async fn until_shutdown(
    mut ingest: JoinHandle<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> Option<anyhow::Error> {
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
    let result = match early {
        Some(result) => result,
        None => ingest.await,
    };
    match result {
        Ok(Ok(())) if ended_early => Some(anyhow::anyhow!("ingest stopped unexpectedly")),
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error.context("ingest failed")),
        Err(error) => Some(anyhow::Error::new(error).context("ingest panicked")),
    }
}

/// What the stages share, made once per process start.
struct Shared {
    store: Store,
    producer: StatusProducer,
    metrics: Arc<Metrics>,
    control: Control,
    /// One owner per process start: a restarted process (same INSTANCE_ID) must not renew the
    /// leases of letters its killed predecessor claimed; they expire and are reaped.
    owner: String,
    suppressions: Suppressions,
    lease: Arc<LeaseClock>,
    budget: Arc<Budget>,
    /// The lanes' virtual clocks and the flows' places (`crate::priority`).
    fairness: Arc<Fairness>,
}

/// How ingest wakes the dispatcher: any stored letter, and one that goes before those held.
struct Wakes {
    wake: Arc<Notify>,
    express: Arc<Notify>,
}

impl Shared {
    fn new(config: &Config, store: Store, producer: StatusProducer, metrics: Arc<Metrics>, control: Control) -> Shared {
        let owner = format!("{}-{}", config.instance_id, &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let suppressions = Suppressions::new(&store, config.deliverability.suppress_after_hard_bounces);
        let lease = Arc::new(LeaseClock::new(config.dispatch.lease, control.cancels()));
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
        Shared { store, producer, metrics, control, owner, suppressions, lease, budget, fairness: Arc::default() }
    }

    /// `SMTP_SANDBOX`'s simulator addresses, whose events take the real events' path.
    fn sandbox(
        &self,
        config: &Config,
    ) -> Option<(crate::feedback::sandbox::Simulator, crate::feedback::sandbox::Mailbox)> {
        if !config.smtp.sandbox {
            return None;
        }
        let feedback = crate::feedback::Feedback {
            store: self.store.feedback(config.kafka.message_timeout + Duration::from_secs(10)),
            suppressions: self.suppressions.clone(),
            producer: self.producer.clone(),
            topic: config.feedback.topic.clone(),
            metrics: self.metrics.clone(),
        };
        Some(crate::feedback::sandbox::Simulator::new(feedback))
    }

    fn report(&self, config: &Config, sandbox: Option<crate::feedback::sandbox::Simulator>) -> Report {
        Report {
            sandbox,
            store: self.store.clone(),
            producer: self.producer.clone(),
            topic: config.kafka.topic_out.clone(),
            owner: self.owner.clone(),
            metrics: self.metrics.clone(),
            body_max: config.kafka.status_body_max_bytes,
            suppressions: self.suppressions.clone(),
        }
    }

    fn ingest(
        &self,
        config: &Config,
        consumer: Arc<IngestConsumer>,
        wakes: &Wakes,
        running: Arc<AtomicBool>,
    ) -> Ingest {
        Ingest {
            consumer,
            producer: self.producer.clone(),
            store: self.store.clone(),
            config: config.kafka.clone(),
            metrics: self.metrics.clone(),
            wake: wakes.wake.clone(),
            express: wakes.express.clone(),
            fairness: self.fairness.clone(),
            running,
        }
    }

    /// Holds no more letters than the budget lets the workers send within half a lease.
    fn dispatcher(&self, config: &Config, wakes: Wakes) -> Dispatcher {
        let capacity = Dispatcher::capacity(&config.dispatch, config.smtp.max_senders, self.budget.plan().rate());
        Dispatcher {
            store: self.store.clone(),
            config: config.dispatch.clone(),
            owner: self.owner.clone(),
            control: self.control.clone(),
            capacity: Arc::new(Semaphore::new(capacity)),
            wake: wakes.wake,
            lease: self.lease.clone(),
            low_water: Dispatcher::low_water(&config.dispatch, capacity),
            memory: Memory::new(config.dispatch.max_bytes),
            suppressions: self.suppressions.clone(),
            // As much again as one regular claim, for the letters that go first.
            express: {
                let size = Dispatcher::low_water(&config.dispatch, capacity);
                Express { wake: wakes.express, capacity: Arc::new(Semaphore::new(size)), size }
            },
            fairness: self.fairness.clone(),
        }
    }

    fn admin_state(
        &self,
        config: &Config,
        report: &Report,
        send: &SendContext,
        consuming: &Arc<AtomicBool>,
        shutdown: &CancellationToken,
        posts: PostDoor,
    ) -> Arc<HttpState> {
        Arc::new(HttpState {
            producer: self.producer.clone(),
            store: self.store.clone(),
            topic_in: config.kafka.topic_in.clone(),
            relays: send.relays.clone(),
            sandbox: config.smtp.sandbox,
            admin_token: config.http.admin_token.clone(),
            admin_networks: config.http.admin_networks.clone(),
            control: self.control.clone(),
            instance_id: config.instance_id.clone(),
            report: report.clone(),
            metrics: self.metrics.clone(),
            consumer_running: consuming.clone(),
            shutdown: shutdown.clone(),
            readiness: Default::default(),
            budget: self.budget.clone(),
            posts,
            attachments: config.kafka.attachments,
        })
    }

    fn public_state(
        &self,
        config: &Config,
        template: &crate::deliverability::unsubscribe::UrlTemplate,
    ) -> anyhow::Result<Arc<PublicState>> {
        let secret = config.deliverability.unsubscribe_secret.as_ref().context("UNSUBSCRIBE_SECRET is unset")?;
        Ok(Arc::new(PublicState {
            template: template.clone(),
            signer: Signer::new(secret),
            suppressions: self.suppressions.clone(),
            producer: self.producer.clone(),
            topic: config.deliverability.topic_unsubscribed.clone(),
            store: self.store.clone(),
            events: self.store.unsubscribed(),
            publish_lease: config.kafka.message_timeout + Duration::from_secs(10),
        }))
    }

    /// The background jobs; each ending before `until` is a failure.
    fn chores(
        &self,
        config: &Config,
        report: Report,
        suppression_consumer: rdkafka::consumer::StreamConsumer,
        sandbox: Option<crate::feedback::sandbox::Mailbox>,
        supervisor: &Supervisor,
        until: &CancellationToken,
    ) -> TaskTracker {
        let chores = TaskTracker::new();
        // After the report stage, so the events of its last outcomes are still made.
        if let Some(mailbox) = sandbox {
            chores.spawn(supervisor.watch("the sandbox's mailbox", until, mailbox.run(until.clone())));
        }
        let expiry = crate::pipeline::expiry::run(report.clone(), until.clone());
        chores.spawn(supervisor.watch("expiry", until, expiry));
        let republish = report.republish(
            config.chores.republish_interval,
            config.chores.republish_batch,
            config.kafka.message_timeout + Duration::from_secs(15),
            until.clone(),
        );
        chores.spawn(supervisor.watch("the republisher", until, republish));

        let lease = self.lease.clone();
        let maintain =
            Dispatcher::maintain(self.store.clone(), config.dispatch.clone(), self.owner.clone(), lease, until.clone());
        chores.spawn(supervisor.watch("lease maintenance", until, maintain));
        let (retention, every) = (config.chores.retention, config.chores.retention_interval);
        let retention = crate::retention::run(self.store.clone(), self.owner.clone(), retention, every, until.clone());
        chores.spawn(supervisor.watch("retention", until, retention));
        let topic = SuppressionTopic {
            consumer: suppression_consumer,
            topic: config.deliverability.topic_suppressions.clone(),
            topic_dlq: config.kafka.topic_dlq.clone(),
            suppressions: self.suppressions.clone(),
            producer: self.producer.clone(),
        };
        chores.spawn(supervisor.watch("the suppression topic", until, topic.run(until.clone())));
        chores.spawn(supervisor.watch("the control watch", until, self.control.clone().watch(until.clone())));
        let brake = crate::feedback::brake::Brake {
            store: self.store.feedback(config.kafka.message_timeout + Duration::from_secs(10)),
            control: self.control.clone(),
            metrics: self.metrics.clone(),
            config: config.feedback.brake.clone(),
            instance_id: config.instance_id.clone(),
        };
        chores.spawn(supervisor.watch("the reputation brake", until, brake.run(until.clone())));
        let gauge = refresh_status_gauge(self.store.clone(), self.metrics.clone(), until.clone());
        chores.spawn(supervisor.watch("the status gauge", until, gauge));
        chores.close();
        chores
    }

    /// Stops taking reports when shutdown starts; a session cut short answers 421 or 451, and
    /// the sending MTA delivers its report again.
    fn serve_feedback(&self, config: &Config, listener: TcpListener, shutdown: &CancellationToken) {
        let (suppressions, producer, metrics) =
            (self.suppressions.clone(), self.producer.clone(), self.metrics.clone());
        crate::feedback::listener::start(
            listener,
            config,
            &self.store,
            suppressions,
            producer,
            metrics,
            shutdown.clone(),
        );
    }

    async fn release_leases(&self) {
        match self.store.release_all(&self.owner).await {
            Ok(released) => tracing::info!(released, "returned this instance's unsent letters to awaiting"),
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                "releasing letters failed; their leases will expire instead"
            ),
        }
    }
}

fn serve_admin(
    listener: TcpListener,
    state: Arc<HttpState>,
    max_body_bytes: usize,
    stop: &CancellationToken,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    // The peer address is what the admin routes' network check looks at.
    let service = admin::router(state, max_body_bytes).into_make_service_with_connect_info::<SocketAddr>();
    Ok(tokio::spawn(
        axum::serve(listener, service).with_graceful_shutdown(stop.clone().cancelled_owned()).into_future(),
    ))
}

/// The one-click endpoint, the relays' webhooks, or both, on `PUBLIC_HTTP_ADDR`.
fn serve_public(
    listener: TcpListener,
    one_click: Option<Arc<PublicState>>,
    webhooks: Option<Arc<crate::feedback::webhooks::Webhooks>>,
    stop: &CancellationToken,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let mut router = axum::Router::new();
    if let Some(state) = one_click {
        router = public::router(state);
        tracing::info!(addr = %listener.local_addr()?, "one-click unsubscribe endpoint listening");
    }
    // Its routes take precedence over the one-click endpoint's catch-all.
    if let Some(webhooks) = webhooks {
        router = router.merge(crate::feedback::webhooks::router(webhooks));
        tracing::info!(addr = %listener.local_addr()?, "relay webhooks listening");
    }
    let server = axum::serve(listener, router).with_graceful_shutdown(stop.clone().cancelled_owned());
    Ok(tokio::spawn(server.into_future()))
}

/// Ends the process when a stage ends or panics outside shutdown: it starts the shutdown (which
/// releases what this instance holds) and makes the process exit non-zero, so Kubernetes
/// restarts it instead of leaving a live pod that moves no letter.
struct Supervisor {
    shutdown: CancellationToken,
    /// Why the first stage that failed did.
    failure: Arc<OnceLock<String>>,
    /// `MAILSENDER_FAULT_INJECTION=panic:STAGE`: that stage panics a second after it starts. For
    /// the tests that prove a failing stage ends the process; never set in production.
    inject: Option<String>,
}

impl Supervisor {
    fn new(config: &Config, shutdown: &CancellationToken) -> Supervisor {
        let inject = config.fault_injection.as_deref().and_then(|i| i.strip_prefix("panic:")).map(str::to_owned);
        Supervisor { shutdown: shutdown.clone(), failure: Arc::default(), inject }
    }

    fn spawn<F>(&self, name: &'static str, until: &CancellationToken, stage: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(self.watch(name, until, stage))
    }

    /// Runs a stage that should run until `until`; if it ends or panics before, records why and
    /// starts the shutdown.
    fn watch<F>(&self, name: &'static str, until: &CancellationToken, stage: F) -> impl Future<Output = ()> + use<F>
    where
        F: Future<Output = ()>,
    {
        let (failure, until, shutdown) = (self.failure.clone(), until.clone(), self.shutdown.clone());
        let inject = self.inject.as_deref().is_some_and(|stage| name.contains(stage));
        async move {
            let stage = async move {
                if inject {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    panic!("fault injected into {name}");
                }
                stage.await
            };
            let why = match std::panic::AssertUnwindSafe(stage).catch_unwind().await {
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
            let _ = failure.set(why);
            shutdown.cancel();
        }
    }

    fn failure(&self) -> Option<anyhow::Error> {
        self.failure.get().map(|why| anyhow::anyhow!("{why}"))
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
    let (store, metrics) = (&store, &metrics);
    chore("the status gauge", Duration::from_secs(15), shutdown, move || async move {
        match store.count_by_status().await {
            Ok(counts) => {
                for status in ["awaiting", "processing", "sent", "error"] {
                    let n = counts.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
                    metrics.by_status.get_or_create(&StatusLabel { status: status.to_owned() }).set(n);
                }
            }
            Err(error) => tracing::debug!(error = format!("{error:#}"), "counting letters by status failed"),
        }
    })
    .await;
}
