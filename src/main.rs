//! The `herald` binary: parse the command line, load settings, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald::config::{Role, Settings, Sources};
use herald::metrics::Metrics;
use herald::providers::Providers;
use herald::startup::Application;

/// jemalloc instead of glibc's malloc: on the fallback path (a reqwest/h2 request per
/// target, each a few dozen short-lived allocations across the worker threads) glibc's
/// malloc, free and realloc were a quarter of herald's CPU, with arena consolidation among
/// the top symbols. mimalloc saved a little more CPU but held 13% more memory per idle
/// session, which is what a gateway of many devices spends (docs/benchmarks.md,
/// "Allocator", for the three side by side).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Push-notification dispatch: live WebSocket first, APNs/FCM fallback"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the roles in the config: api, gateway, dispatcher).
    Serve {
        /// A TOML file layered over the defaults (and under HERALD__* variables).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Load and validate the configuration (with the provider key files `serve` would
    /// load), print the effective settings (secrets redacted), and exit: 2 with the
    /// offending key if anything is wrong.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The reference device client: hold a session, print each notification as one JSON
    /// line on stdout, ack it, reconnect with backoff. Exits 3 if the token is refused.
    Connect {
        /// e.g. ws://localhost:8080/v1/connect, or wss://... through a TLS front
        #[arg(long)]
        url: String,
        /// A device token (POST /v1/devices/{device_id}/token).
        #[arg(long, env = "HERALD_DEVICE_TOKEN", hide_env_values = true)]
        token: String,
        /// First reconnect delay ceiling; doubles per failed attempt (full jitter).
        #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
        backoff_min: std::time::Duration,
        /// Largest reconnect delay.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        backoff_max: std::time::Duration,
        /// Extra CA bundle (PEM) trusted for wss:// on top of the system roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, check_only) = match cli.command {
        Command::Serve { config } => (config, false),
        Command::CheckConfig { config } => (config, true),
        Command::Connect {
            url,
            token,
            backoff_min,
            backoff_max,
            ca_file,
        } => {
            return connect(herald::client::ConnectOptions {
                url,
                token,
                backoff_min,
                backoff_max: backoff_max.max(backoff_min),
                ca_file,
            });
        }
    };
    let settings = match Settings::load(Sources::from_process(config)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        // `serve` reads the provider key files (and checks apns.key_id, team_id, topic,
        // endpoints, CA files) when it builds the providers, on a node with the dispatcher
        // role: the same build runs here, so check-config refuses what serve would.
        if settings.has_role(Role::Dispatcher)
            && let Err(e) = Providers::from_settings(&settings, &Metrics::new())
        {
            eprintln!("herald: {e:#}");
            return ExitCode::from(2);
        }
        println!("{settings:#?}");
        match settings.apps_summary() {
            Ok(summary) => print!("{summary}"),
            Err(e) => {
                eprintln!("herald: {e}");
                return ExitCode::from(2);
            }
        }
        return ExitCode::SUCCESS;
    }
    herald::telemetry::init(&settings.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "herald failed");
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit codes: 0 stopped by SIGINT/SIGTERM, 3 token refused, 4 replaced by a newer
/// session, 2 bad arguments, 1 anything else.
fn connect(opts: herald::client::ConnectOptions) -> ExitCode {
    herald::telemetry::init(&herald::config::LogSettings {
        level: "info".into(),
        format: herald::config::LogFormat::Text,
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald connect: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let stop = herald::shutdown::Shutdown::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            herald::shutdown::signal().await;
            on_signal.cancel();
        });
        let mut stdout = std::io::stdout();
        herald::client::run(opts, &mut stdout, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald connect: {e}");
            ExitCode::from(match e {
                herald::client::ClientError::Unauthorized(_) => 3,
                herald::client::ClientError::Replaced => 4,
                herald::client::ClientError::BadUrl(_)
                | herald::client::ClientError::BadCaFile(_) => 2,
            })
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let roles = settings.roles.clone();
    let app = Application::build(settings).await?;
    tracing::info!(addr = %app.addr(), backend = app.queue().backend_name(), ?roles, "herald listening");
    if app.queue().backend_name() == "embedded" {
        tracing::warn!(
            "embedded queue: accepted notifications live in this process's memory and are lost if it crashes; set queue.url (HERALD__QUEUE__URL) to use RabbitMQ"
        );
    }
    if let Some(key) = app.generated_api_key() {
        // Printed on stdout, not logged: log pipelines are no place for a credential.
        tracing::warn!(
            "no API key configured: generated one for this run and printed it on stdout"
        );
        println!("herald: generated API key (no auth.api_keys configured): {key}");
        println!(
            "herald: try  curl -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{\"targets\":[{{\"device_id\":\"phone-42\"}}],\"data\":{{\"k\":\"v\"}}}}' http://{}/v1/notify",
            app.addr()
        );
    }
    let shutdown = app.shutdown_handle();
    tokio::spawn(async move {
        herald::shutdown::signal().await;
        shutdown.cancel();
    });
    app.run_until_stopped().await
}
