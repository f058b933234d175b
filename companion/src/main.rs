//! `ibex-companion` binary: parses the command line and runs one subcommand.
//! All behaviour lives in the library so tests can drive it in-process.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ibex_companion::admin::{self, AdminError};
use ibex_companion::cli::{Cli, Command};
use ibex_companion::{db, migrate, rest, shutdown, store, subscribe, telemetry, Error};
use ibex_wire::Redacted;

/// Exit code when Postgres was changed but the invalidation was not published.
const EXIT_PUBLISH_FAILED: u8 = 3;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init();
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        // Plain stderr rather than tracing: these must reach the operator
        // whatever RUST_LOG says.
        Err(AdminError::Publish(e)) => {
            eprintln!(
                "warning: the database change is committed, but the invalidation was not \
                 published ({e}); caches serve the previous directive until their TTL expires. \
                 Run `ibex-companion flush` once Redis is reachable."
            );
            ExitCode::from(EXIT_PUBLISH_FAILED)
        }
        Err(AdminError::KeyPublish(e)) => {
            eprintln!(
                "warning: the key is revoked in the database, but the invalidation was not \
                 published ({e}); caches may accept the key until their TTL expires. \
                 Run the revoke-key again or `ibex-companion flush` once Redis is reachable."
            );
            ExitCode::from(EXIT_PUBLISH_FAILED)
        }
        Err(AdminError::Failed(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), AdminError> {
    match command {
        Command::Migrate(args) => {
            let mut client = db::connect(&args.db.endpoint()?, admin::ADMIN_TIMEOUT).await?;
            let applied = migrate::run(&mut client).await?;
            println!("applied {} migration(s)", applied.len());
        }
        Command::Store(args) => {
            let settings = db::PoolSettings {
                max_size: args.pool_size,
                acquire_timeout: Duration::from_millis(args.acquire_timeout_ms),
                statement_timeout: Duration::from_millis(args.statement_timeout_ms),
            };
            let pool = db::read_only_pool(&args.db.endpoint()?, &settings)?;
            let options = store::StoreOptions {
                lookup_timeout: Duration::from_millis(args.lookup_timeout_ms),
                single_flight: !args.no_single_flight,
                ..Default::default()
            };
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(Error::from)?;
            let state = match &args.redis_url {
                None => store::StoreState::new(pool, options),
                Some(url) => {
                    let client =
                        ibex_companion::redis_conn::RedisEndpoint::new(url.expose().clone())
                            .client()?;
                    let guard = store::InvalidationGuard::new(
                        client,
                        &args.key_prefix,
                        store::DEFAULT_GUARD_TIMEOUT,
                    );
                    let window = Duration::from_millis(args.share_window_ms);
                    store::StoreState::with_guard(pool, options, guard, window)
                }
            };
            store::run(listener, state, shutdown::signal())
                .await
                .map_err(Error::from)?;
        }
        Command::SetDirective(args) => {
            let content = args.source.read()?;
            let redis = args.change.publish_endpoint()?;
            let outcome = admin::set_directive(
                &args.change.db.endpoint()?,
                redis.as_ref(),
                args.agent_id,
                args.org_id.unwrap_or(admin::DEMO_ORG_ID),
                &content,
            )
            .await?;
            println!("{}", outcome.version_id);
        }
        Command::ClearDirective(args) => {
            let redis = args.change.publish_endpoint()?;
            let n =
                admin::clear_directive(&args.change.db.endpoint()?, redis.as_ref(), args.agent_id)
                    .await?;
            println!("{n}");
        }
        Command::History(args) => {
            let rows =
                admin::history(&args.db.endpoint()?, args.agent_id, args.show_content).await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", admin::history_header(args.show_content)).map_err(Error::from)?;
            for row in rows {
                writeln!(out, "{}", row.to_line()).map_err(Error::from)?;
            }
            // Written through a Result, not println!: a closed pipe (`| head`)
            // is an error exit, not a panic.
            out.flush().map_err(Error::from)?;
        }
        Command::Activate(args) => {
            let redis = args.change.publish_endpoint()?;
            let outcome =
                admin::activate(&args.change.db.endpoint()?, redis.as_ref(), args.version_id)
                    .await?;
            println!("{}\t{}", outcome.agent_id, outcome.version_id);
            if outcome.already_active {
                let published = if redis.is_some() {
                    " (its update was published again)"
                } else {
                    ""
                };
                eprintln!(
                    "note: this version was already active; the database is unchanged{published}"
                );
            }
        }
        Command::Flush(args) => {
            admin::publish(&args.redis.endpoint()?, ibex_wire::FLUSH_CHANNEL).await?;
        }
        Command::Subscribe(args) => {
            let redis = args.redis.endpoint()?;
            let mut config = subscribe::SubscribeConfig::with_endpoint(
                redis,
                args.control_urls,
                args.control_token.map(Redacted::into_inner),
                args.key_prefix,
            )?;
            config.retry = subscribe::RetryPolicy {
                initial: Duration::from_millis(args.retry_initial_ms.max(1)),
                max: Duration::from_millis(args.retry_max_ms.max(1)),
                deadline: Duration::from_millis(args.retry_deadline_ms),
            };
            config.request_timeout = Duration::from_millis(args.request_timeout_ms.max(1));
            config.tombstone_ttl = (args.tombstone_ttl_seconds > 0)
                .then(|| Duration::from_secs(args.tombstone_ttl_seconds));
            config.ping_interval = Duration::from_millis(args.ping_interval_ms.max(10));
            let subscriber = subscribe::Subscriber::new(config)?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(Error::from)?;
            subscribe::run(subscriber, Some(listener), shutdown::signal())
                .await
                .map_err(Error::from)?;
        }
        Command::Rest(args) => {
            let endpoint = args.redis.endpoint()?;
            let client: rest::link::Backend = if endpoint.is_cluster() {
                let timeout = Duration::from_millis(args.redis_timeout_ms.max(1));
                endpoint.cluster_client(timeout)?.into()
            } else {
                endpoint.client()?.into()
            };
            let options = rest::RestOptions {
                max_body_bytes: args.max_body_bytes,
                limits: rest::command::Limits {
                    max_pipeline_commands: args.max_pipeline_commands,
                    max_command_args: args.max_command_args,
                    max_request_args: args.max_request_args,
                },
                allow_any_script: args.allow_any_script,
                key_prefix: args.key_prefix,
                redis_timeout: Duration::from_millis(args.redis_timeout_ms.max(1)),
                body_timeout: Duration::from_millis(args.body_timeout_ms),
                serve: rest::ServeOptions {
                    header_timeout: Duration::from_millis(args.header_timeout_ms),
                    idle_timeout: Duration::from_millis(args.idle_timeout_ms),
                    max_connections: args.max_connections,
                    shutdown_grace: Duration::from_millis(args.shutdown_grace_ms),
                },
            };
            // The front keeps the tokens' digests only; the copies read here and
            // clap's are dropped (not zeroed) before it serves. A token given by
            // flag or environment stays in the process's argv or environ all
            // the same (see the README).
            let state = {
                let token = args.token.resolve()?;
                let admin = args.admin_token.resolve()?;
                rest::RestState::new(client, &token, admin.as_ref(), options)?
            };
            drop(args.token);
            drop(args.admin_token);
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(Error::from)?;
            rest::run(listener, state, shutdown::signal())
                .await
                .map_err(Error::from)?;
        }
        Command::IssueKey(args) => {
            let issued = admin::issue_key(
                &args.db.endpoint()?,
                args.agent_id,
                args.org_id.unwrap_or(admin::DEMO_ORG_ID),
                args.label.as_deref(),
            )
            .await?;
            // The key, once, alone on stdout; everything else on stderr.
            println!("{}", issued.key.expose());
            eprintln!(
                "agent_id={} key_sha256={}",
                args.agent_id, issued.key_sha256
            );
            eprintln!("This key is shown once and cannot be recovered: store it now.");
        }
        Command::RevokeKey(args) => {
            let key = args.key.resolve()?;
            let redis = args.change.publish_endpoint()?;
            let outcome =
                admin::revoke_key(&args.change.db.endpoint()?, redis.as_ref(), key).await?;
            println!("{key}");
            if !outcome.newly_revoked {
                eprintln!("note: the key was already revoked");
            }
        }
        Command::ListKeys(args) => {
            let rows = admin::list_keys(&args.db.endpoint()?, args.agent_id).await?;
            println!("key_sha256\tcreated_at\trevoked_at\tlabel");
            for row in rows {
                println!(
                    "{}\t{}\t{}\t{}",
                    row.key_sha256,
                    row.created_at,
                    row.revoked_at.as_deref().unwrap_or("-"),
                    // Labels are checked on issue; a row written by other
                    // means still cannot break the columns.
                    row.label.unwrap_or_default().replace(char::is_control, " ")
                );
            }
        }
    }
    Ok(())
}
