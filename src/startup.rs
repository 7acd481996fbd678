//! Builds a herald process from settings: bind the listener first (so tests can use port 0
//! and learn the real one), build the queue, start the roles the config enables, and run
//! until the shutdown signal, then drain within the grace period.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::api::{ApiKeys, AppState};
use crate::config::{Role, Settings};
use crate::directory::{ClusterDirectory, Directory, cluster};
use crate::dispatch::reaper::{self, ReapSettings};
use crate::dispatch::{Dispatcher, DispatcherHandle};
use crate::domain::NotifyLimits;
use crate::events::Events;
use crate::gateway::{DeviceTokens, Gateway};
use crate::http_server::{self, Routes};
use crate::inbox::Inbox;
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::queue::Queue;
use crate::shutdown::{Shutdown, StopTree};

pub struct Application {
    addr: SocketAddr,
    server: actix_web::dev::Server,
    queue: Queue,
    metrics: Metrics,
    shutdown: Shutdown,
    stop: StopTree,
    grace: Duration,
    generated_api_key: Option<String>,
    gateway: Option<Gateway>,
    cluster: Option<ClusterDirectory>,
    dispatcher: Option<DispatcherHandle>,
    events: Option<Events>,
    inbox: Option<Inbox>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(settings.listen_addr())
            .with_context(|| format!("binding http.addr {}", settings.http.addr))?;
        let addr = listener.local_addr()?;
        let metrics = Metrics::new();
        let shutdown = Shutdown::new();
        let stop = StopTree::new();
        let queue = Queue::from_settings_under(&settings, &metrics, stop.queue.clone())?;

        let apps = settings.apps()?;
        for app in &apps {
            metrics.register_app(app.id.as_str());
        }
        let (keys, generated_api_key) = ApiKeys::or_minted(&apps, settings.has_role(Role::Api));
        let device_tokens = DeviceTokens::new(
            settings.device_token_secret()?.as_ref(),
            settings.auth.device_token_ttl,
        );
        let gateway = settings.has_role(Role::Gateway).then(|| {
            Gateway::new(
                settings.gateway.clone(),
                settings.notify.max_frame_bytes,
                device_tokens.clone(),
                metrics.clone(),
                stop.gateway.clone(),
            )
        });

        // Cluster mode (RabbitMQ): a gateway node announces its sessions on the presence
        // exchange; a dispatcher node (with or without the gateway role) keeps a replica
        // of device -> node and delivers through it. An API-only node needs neither.
        let cluster = match &queue {
            Queue::Rabbit(q)
                if settings.has_role(Role::Gateway) || settings.has_role(Role::Dispatcher) =>
            {
                Some(ClusterDirectory::start(
                    q.clone(),
                    &settings.queue.prefix,
                    &settings.cluster,
                    settings.gateway.ack_timeout,
                    cluster::Roles {
                        gateway: gateway.clone(),
                        lookups: settings.has_role(Role::Dispatcher),
                    },
                    metrics.clone(),
                    stop.directory.clone(),
                ))
            }
            _ => None,
        };
        let directory = Directory::for_node(cluster.as_ref(), gateway.as_ref());

        // The offline inbox, for dispatchers (store) and gateways (replay).
        let inbox = if settings.has_role(Role::Dispatcher) || settings.has_role(Role::Gateway) {
            Inbox::from_settings(&settings)
                .await
                .context("opening the offline inbox (inbox.url)")?
        } else {
            None
        };
        match &inbox {
            Some(inbox) => tracing::info!(backend = inbox.backend_name(), "offline inbox on"),
            None if cluster.is_some() => tracing::warn!(
                "no offline inbox (cluster mode without inbox.url): a target with no session and no provider route is retried, then dead-lettered after retry.max_attempts"
            ),
            None => {}
        }
        if let (Some(g), Some(i)) = (&gateway, &inbox) {
            g.set_inbox(i.clone());
        }

        // One event sink per process, for its dispatcher (outcomes) and its gateway
        // (`session_replaced`, `replayed`); an API-only node emits none.
        let events = (settings.has_role(Role::Dispatcher) || settings.has_role(Role::Gateway))
            .then(|| Events::start(&settings.events, &apps, &queue, &metrics, &stop.events))
            .transpose()?;
        if let (Some(g), Some(e)) = (&gateway, &events) {
            g.set_events(e.clone());
        }

        let dispatcher = if let Some(events) = events
            .as_ref()
            .filter(|_| settings.has_role(Role::Dispatcher))
        {
            let providers = Providers::from_apps(&apps, &metrics)?;
            if let Some(i) = &inbox {
                let reap = ReapSettings {
                    interval: settings.inbox.reap_interval,
                    batch: settings.inbox.reap_batch,
                };
                reaper::spawn(
                    i.clone(),
                    reap,
                    metrics.clone(),
                    events.clone(),
                    stop.reaper.clone(),
                );
            }
            let dispatcher = Dispatcher {
                queue: queue.clone(),
                directory: directory.clone(),
                gateway: gateway.clone(),
                inbox: inbox.clone(),
                providers: std::sync::Arc::new(providers),
                events: events.clone(),
                metrics: metrics.clone(),
                retry: settings.retry.clone(),
                in_flight: settings.queue.prefetch.into(),
                target_concurrency: settings.dispatcher.target_concurrency,
                max_awaiting_ack: settings.dispatcher.max_awaiting_ack,
            }
            .spawn_under(stop.dispatcher.clone());
            Some(dispatcher)
        } else {
            None
        };

        let state = AppState {
            require_consumer: dispatcher.is_some(),
            cluster: cluster.clone(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            limits: NotifyLimits {
                max_targets: settings.notify.max_targets,
                default_ttl: settings.notify.default_ttl,
                max_ttl: settings.notify.max_ttl,
            },
            max_body_bytes: settings.http.max_body_bytes,
            max_frame_bytes: settings.notify.max_frame_bytes,
            retry_after: settings.queue.retry_after,
            shutdown: shutdown.clone(),
        };
        let server = http_server::start(
            listener,
            &settings.http,
            Routes {
                state,
                keys,
                device_tokens,
                api_role: settings.has_role(Role::Api),
                gateway: gateway.clone(),
            },
        )?;

        Ok(Application {
            addr,
            server,
            queue,
            metrics,
            shutdown,
            stop,
            grace: settings.http.shutdown_grace,
            generated_api_key,
            gateway,
            cluster,
            dispatcher,
            events,
            inbox,
        })
    }

    /// Live delivery as this node's dispatcher does it: the cluster directory in cluster
    /// mode, else this node's own sessions; `None` when neither exists here.
    pub fn directory(&self) -> Option<Directory> {
        Directory::for_node(self.cluster.as_ref(), self.gateway.as_ref())
    }

    /// The cluster directory (RabbitMQ backend with the gateway or dispatcher role).
    pub fn cluster(&self) -> Option<&ClusterDirectory> {
        self.cluster.as_ref()
    }

    /// The bound address (the real port when `http.addr` asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The API key generated because none was configured, to be printed once.
    pub fn generated_api_key(&self) -> Option<&str> {
        self.generated_api_key.as_deref()
    }

    /// Cancel this to shut the application down (what SIGTERM does in `herald serve`).
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The offline inbox this process stores to and replays from, if any.
    pub fn inbox(&self) -> Option<&Inbox> {
        self.inbox.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves until the shutdown signal (or the server fails), then drains through the
    /// [`StopTree`], leaves first (shutdown.rs has the tree), all bounded by
    /// `http.shutdown_grace`; past it, the root is cancelled and every loop stops.
    pub async fn run_until_stopped(mut self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let mut server = tokio::spawn(self.server);
        // The HTTP server stops on its node of the tree (or any parent's).
        let http_stop = self.stop.http.clone();
        let http_stopped = tokio::spawn(async move {
            http_stop.cancelled().await;
            handle.stop(true).await;
        });
        tokio::select! {
            res = &mut server => {
                self.stop.queue.cancel();
                self.queue.close().await;
                return res.context("HTTP server task")?.context("HTTP server");
            }
            _ = self.shutdown.cancelled() => {}
        }
        let started = Instant::now();
        tracing::info!(grace = ?self.grace, "draining");
        let deadline = tokio::time::Instant::now() + self.grace;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let stop = self.stop.clone();
        let dispatcher = self.dispatcher.take();
        let drain = async {
            // 1. dispatcher: stops consuming and finishes what it holds, while the gateway
            //    can still deliver live and the sinks still take events; given most of the
            //    grace period. What it cannot finish goes back to the queue unacked.
            if let Some(d) = dispatcher {
                let budget = self.grace.mul_f64(0.6);
                if !d.drain(budget).await {
                    tracing::warn!(
                        ?budget,
                        "dispatcher did not finish in time; unfinished messages return to the queue"
                    );
                }
            }
            // 2. gateway: sessions, long-lived requests the HTTP server would otherwise
            //    wait on. In-flight ack waits finish, then "reconnect elsewhere" and, in
            //    cluster mode, every session is unbound so other nodes' lookups get
            //    "offline" from the broker at once. The event sinks keep sending meanwhile
            //    (they are not stopped, so a slow webhook does not hold up the sessions'
            //    goodbye), and take what the gateway emits until it is done (`replayed` for
            //    acks that came in during the drain, `session_replaced`).
            if let Some(gateway) = &self.gateway {
                gateway.shutdown(left()).await;
            }
            stop.gateway.cancel();
            // 3. events: the dispatcher and the gateway are done, so every event of the
            //    drain is in the sinks' buffers; they send it all, then stop. Only when
            //    the gateway's shutdown ran out of the grace period can a session still be
            //    closing; an event it emits after this is dropped, counted as
            //    `herald_events_dropped_total{reason="stopped"}`.
            stop.events.cancel();
            if let Some(events) = &self.events {
                let _ = tokio::time::timeout(left(), events.flushed()).await;
            }
            // 4. http: requests in flight finish.
            stop.http.cancel();
            let _ = http_stopped.await;
            let _ = (&mut server).await;
            // 5. directory, then 6. the queue, last.
            stop.directory.cancel();
            let depth = self.metrics.queue_depth.get();
            if matches!(self.queue, Queue::Memory(_)) && depth > 0 {
                tracing::warn!(
                    notifications = depth,
                    "embedded queue: undelivered notifications are lost as the process exits"
                );
            }
            self.queue.close().await;
            if let Some(inbox) = &self.inbox {
                inbox.close().await;
            }
        };
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(grace = ?self.grace, "drain did not finish within the grace period; exiting anyway");
            self.stop.queue.cancel();
        }
        tracing::info!(took = ?started.elapsed(), "stopped");
        Ok(())
    }
}
