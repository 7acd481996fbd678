//! Builds a herald process from settings: bind the listener first (so tests can use port 0
//! and learn the real one), build the queue, start the roles the config enables, and run
//! until the shutdown signal, then drain within the grace period.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use actix_web::{App, middleware, web};
use anyhow::Context;

use crate::api::{self, ApiKeys, AppState};
use crate::config::{Role, Settings};
use crate::directory::{ClusterDirectory, Directory};
use crate::dispatch::{Dispatcher, DispatcherHandle};
use crate::domain::NotifyLimits;
use crate::events::Events;
use crate::gateway::{DeviceTokens, Gateway, GatewayConfig};
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::queue::Queue;
use crate::shutdown::Shutdown;

pub struct Application {
    addr: SocketAddr,
    server: actix_web::dev::Server,
    queue: Queue,
    metrics: Metrics,
    shutdown: Shutdown,
    grace: Duration,
    generated_api_key: Option<String>,
    gateway: Option<Gateway>,
    cluster: Option<ClusterDirectory>,
    dispatcher: Option<DispatcherHandle>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(settings.listen_addr())
            .with_context(|| format!("binding http.addr {}", settings.http.addr))?;
        let addr = listener.local_addr()?;
        let metrics = Metrics::new();
        let shutdown = Shutdown::new();
        let queue = Queue::from_settings(&settings, &metrics)?;

        let apps = settings.apps()?;
        let mut keys = ApiKeys::from_apps(&apps);
        let mut generated_api_key = None;
        if keys.is_empty() && settings.has_role(Role::Api) {
            // Never a silently open API: with no key configured for any app, mint one for
            // this run, for the `default` app.
            let key = hex::encode(rand::random::<[u8; 24]>());
            use sha2::Digest;
            keys = keys.with_default_key(sha2::Sha256::digest(key.as_bytes()).into());
            generated_api_key = Some(key);
        }
        let device_tokens = DeviceTokens::new(
            settings.device_token_secret()?.as_ref(),
            settings.auth.device_token_ttl,
        );
        let gateway = settings.has_role(Role::Gateway).then(|| {
            Gateway::new(
                GatewayConfig::from(&settings.gateway),
                device_tokens.clone(),
                metrics.clone(),
            )
        });

        // Cluster mode (RabbitMQ): the directory is the broker's routing. A gateway node
        // registers its sessions there; a dispatcher node (with or without the gateway
        // role) delivers through it. An API-only node needs neither.
        let cluster = match &queue {
            Queue::Rabbit(q)
                if settings.has_role(Role::Gateway) || settings.has_role(Role::Dispatcher) =>
            {
                Some(ClusterDirectory::start(
                    q.clone(),
                    &settings.queue.prefix,
                    &settings.cluster,
                    settings.gateway.ack_timeout,
                    gateway.clone(),
                ))
            }
            _ => None,
        };
        let directory = match (&cluster, &gateway) {
            (Some(c), _) => Some(Directory::Cluster(c.clone())),
            (None, Some(g)) => Some(Directory::Local(g.clone())),
            (None, None) => None,
        };

        let dispatcher = if settings.has_role(Role::Dispatcher) {
            let events = Events::start(&settings.events, &queue, &metrics, &shutdown)?;
            let providers = Providers::from_apps(&apps, &metrics)?;
            Some(
                Dispatcher {
                    queue: queue.clone(),
                    directory: directory.clone(),
                    providers: std::sync::Arc::new(providers),
                    events,
                    metrics: metrics.clone(),
                    retry: settings.retry.clone(),
                    in_flight: settings.queue.prefetch.into(),
                    target_concurrency: settings.dispatcher.target_concurrency,
                }
                .spawn(),
            )
        } else {
            None
        };

        let state = web::Data::new(AppState {
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
            retry_after: settings.queue.retry_after,
            shutdown: shutdown.clone(),
        });
        let keys = web::Data::new(keys);
        let device_tokens = web::Data::new(device_tokens);
        let gateway_data = gateway.clone().map(web::Data::new);
        let api_role = settings.has_role(Role::Api);
        // actix-web's HttpServer, spelled out, to install one thing it does not expose:
        // the upgrade service. WebSocket upgrades (and any other `Connection: Upgrade`
        // request) go to `gateway::upgrade::handle` with the raw TCP stream, so a device
        // session does not keep actix's per-connection HTTP buffers for its whole life.
        let upgrade_gateway = gateway.clone();
        let grace = settings.http.shutdown_grace.as_secs().max(1);
        let mut builder = actix_server::Server::build()
            // herald handles SIGTERM itself (shutdown.rs) so the drain covers every role.
            .disable_signals()
            .shutdown_timeout(grace);
        if settings.http.workers > 0 {
            builder = builder.workers(settings.http.workers);
        }
        // Tells idle keep-alive connections to close when a graceful stop begins, as
        // actix-web's HttpServer does; without it a stop waits out the whole timeout.
        let graceful_stop = builder.graceful_shutdown_signal();
        let server = builder
            .listen("herald-http", listener, move || {
                let gateway_data = gateway_data.clone();
                let (state, keys, device_tokens) =
                    (state.clone(), keys.clone(), device_tokens.clone());
                let app = move || {
                    let gateway_data = gateway_data.clone();
                    App::new()
                        .app_data(state.clone())
                        .app_data(keys.clone())
                        .app_data(device_tokens.clone())
                        .wrap(middleware::from_fn(api::record_metrics))
                        .configure(|cfg| api::configure(cfg, api_role))
                        .configure(|cfg| {
                            if let Some(gateway) = gateway_data {
                                cfg.app_data(gateway);
                                api::configure_gateway(cfg);
                            }
                        })
                        .default_service(web::to(api::not_found))
                };
                let upgrade_gateway = upgrade_gateway.clone();
                let graceful_stop = graceful_stop.clone();
                actix_http::HttpService::build()
                    .graceful_shutdown_signal(move || {
                        let signal = graceful_stop.clone();
                        async move { signal.notified().await }
                    })
                    .local_addr(addr)
                    .upgrade(actix_service::fn_service(
                        move |(req, framed): (
                            actix_http::Request,
                            actix_codec::Framed<tokio::net::TcpStream, actix_http::h1::Codec>,
                        )| {
                            crate::gateway::upgrade::handle(upgrade_gateway.clone(), req, framed)
                        },
                    ))
                    .finish(actix_service::map_config(
                        actix_service::IntoServiceFactory::into_factory(app()),
                        |_| actix_web::dev::AppConfig::default(),
                    ))
                    .tcp()
            })?
            .run();

        Ok(Application {
            addr,
            server,
            queue,
            metrics,
            shutdown,
            grace: settings.http.shutdown_grace,
            generated_api_key,
            gateway,
            cluster,
            dispatcher,
        })
    }

    /// Live delivery as this node's dispatcher does it: the cluster directory in cluster
    /// mode, else this node's own sessions; `None` when neither exists here.
    pub fn directory(&self) -> Option<Directory> {
        match (&self.cluster, &self.gateway) {
            (Some(c), _) => Some(Directory::Cluster(c.clone())),
            (None, Some(g)) => Some(Directory::Local(g.clone())),
            (None, None) => None,
        }
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

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves until the shutdown token is cancelled (or the server fails), then drains:
    /// readiness turns false, the HTTP server stops accepting and finishes in-flight
    /// requests, then the queue closes, all bounded by `http.shutdown_grace`.
    pub async fn run_until_stopped(mut self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let mut server = tokio::spawn(self.server);
        tokio::select! {
            res = &mut server => {
                self.queue.close().await;
                return res.context("HTTP server task")?.context("HTTP server");
            }
            _ = self.shutdown.cancelled() => {}
        }
        let started = Instant::now();
        tracing::info!(grace = ?self.grace, "draining");
        let deadline = tokio::time::Instant::now() + self.grace;
        let dispatcher = self.dispatcher.take();
        let drain = async {
            // 1. The dispatcher stops consuming and finishes what it holds, while the
            //    gateway can still deliver live; given most of the grace period. What it
            //    cannot finish goes back to the queue unacked.
            if let Some(d) = dispatcher {
                let budget = self.grace.mul_f64(0.6);
                if !d.drain(budget).await {
                    tracing::warn!(
                        ?budget,
                        "dispatcher did not finish in time; unfinished messages return to the queue"
                    );
                }
            }
            // 2. Sessions: long-lived requests the HTTP server would otherwise wait on. The
            //    gateway finishes in-flight ack waits, then sends "reconnect elsewhere" and,
            //    in cluster mode, unbinds every session so other nodes' lookups get
            //    "offline" from the broker at once.
            if let Some(gateway) = &self.gateway {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                gateway.shutdown(left).await;
            }
            // 3. HTTP requests in flight, then the queue.
            handle.stop(true).await;
            let _ = server.await;
            if let Some(c) = &self.cluster {
                c.stop();
            }
            let left = self.metrics.queue_depth.get();
            if matches!(self.queue, Queue::Memory(_)) && left > 0 {
                tracing::warn!(
                    notifications = left,
                    "embedded queue: undelivered notifications are lost as the process exits"
                );
            }
            self.queue.close().await;
        };
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(grace = ?self.grace, "drain did not finish within the grace period; exiting anyway");
        }
        tracing::info!(took = ?started.elapsed(), "stopped");
        Ok(())
    }
}
