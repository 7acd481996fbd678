//! The HTTP server: actix-web's app on actix-http's service, spelled out, to install one
//! thing actix-web's `HttpServer` does not expose: the upgrade service. WebSocket upgrades
//! (and any other `Connection: Upgrade` request) go to [`crate::gateway::upgrade::handle`]
//! with the raw TCP stream, so a device session does not keep actix's per-connection HTTP
//! buffers for its whole life.

use std::net::{SocketAddr, TcpListener};

use actix_web::{App, middleware, web};

use crate::api::{self, ApiKeys, AppState};
use crate::config::HttpSettings;
use crate::gateway::{DeviceTokens, Gateway};

/// What the HTTP workers serve.
pub struct Routes {
    pub state: AppState,
    pub keys: ApiKeys,
    pub device_tokens: DeviceTokens,
    /// The API endpoints (`notify`, device tokens) are mounted only with the api role.
    pub api_role: bool,
    /// `/v1/connect`, on a node with the gateway role.
    pub gateway: Option<Gateway>,
}

/// Starts serving on `listener` (already bound, so a test's port 0 is known). herald
/// handles SIGTERM itself (shutdown.rs): the server only stops through its handle.
pub fn start(
    listener: TcpListener,
    http: &HttpSettings,
    routes: Routes,
) -> std::io::Result<actix_web::dev::Server> {
    let addr: SocketAddr = listener.local_addr()?;
    let state = web::Data::new(routes.state);
    let keys = web::Data::new(routes.keys);
    let device_tokens = web::Data::new(routes.device_tokens);
    let gateway_data = routes.gateway.clone().map(web::Data::new);
    let upgrade_gateway = routes.gateway;
    let api_role = routes.api_role;
    let mut builder = actix_server::Server::build()
        .disable_signals()
        .shutdown_timeout(http.shutdown_grace.as_secs().max(1));
    if http.workers > 0 {
        builder = builder.workers(http.workers);
    }
    // Tells idle keep-alive connections to close when a graceful stop begins, as
    // actix-web's HttpServer does; without it a stop waits out the whole timeout.
    let graceful_stop = builder.graceful_shutdown_signal();
    Ok(builder
        .listen("herald-http", listener, move || {
            let gateway_data = gateway_data.clone();
            let (state, keys, device_tokens) = (state.clone(), keys.clone(), device_tokens.clone());
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
        .run())
}
