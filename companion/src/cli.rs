//! Command-line interface: every flag can also come from the environment.
//!
//! Values that may hold secrets (database and Redis URLs, the control token)
//! are hidden from `--help` output, and those values and directive text are
//! parsed straight into [`Redacted`], so a `Debug` of any argument struct shows
//! their length only.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use ibex_wire::Redacted;
use uuid::Uuid;

use crate::db::PgEndpoint;
use crate::keys::{ApiKey, KeySha256};
use crate::redis_conn::RedisEndpoint;

/// Companion of the ibex-directive Envoy filter.
#[derive(Parser)]
#[command(name = "ibex-companion", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Apply the embedded schema migrations (idempotent).
    Migrate(MigrateArgs),
    /// Serve the directive store HTTP API over a read-only Postgres pool.
    Store(StoreArgs),
    /// Make new text the agent's active directive, then publish its update.
    SetDirective(SetDirectiveArgs),
    /// Deactivate the agent's directive, then publish its update.
    ClearDirective(ClearDirectiveArgs),
    /// List the agent's directive versions, newest first: id, date, which is
    /// active, size (the text only with --show-content). Read-only.
    History(HistoryArgs),
    /// Make an existing directive version its agent's active one (a rollback
    /// or a roll forward), then publish the agent's update.
    Activate(ActivateArgs),
    /// Publish a flush: every cache drops every directive.
    Flush(FlushArgs),
    /// Turn published updates into Redis deletes and Envoy invalidations.
    Subscribe(SubscribeArgs),
    /// Issue a new gateway API key for an agent: prints the key once on stdout
    /// (only its SHA-256 is stored).
    IssueKey(IssueKeyArgs),
    /// Revoke a gateway API key, then publish its update.
    RevokeKey(RevokeKeyArgs),
    /// List an agent's gateway API keys: SHA-256, dates, label (never a key).
    ListKeys(ListKeysArgs),
    /// Serve an Upstash-compatible REST front of Redis (the filter's
    /// `redis.dialect: "upstash"`).
    Rest(RestArgs),
}

/// Postgres connection.
#[derive(Args, Clone)]
pub struct DatabaseArgs {
    /// Postgres connection URL, e.g. postgres://user:pass@127.0.0.1:5432/db.
    /// Its sslmode asks for TLS: verify-full (chain and host name checked),
    /// verify-ca or require (chain checked), prefer (TLS if offered); none, or
    /// disable, is plaintext.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// PEM file of the CA(s) that sign the Postgres server's certificate (a
    /// private CA such as the RDS bundle); then only these are trusted, else
    /// the webpki roots. Needs an sslmode that uses TLS.
    #[arg(long, env = "IBEX_PG_CA_FILE")]
    pub pg_ca_file: Option<PathBuf>,
}

impl DatabaseArgs {
    /// The endpoint these flags name; reads the CA file and checks the URL's
    /// sslmode now, not at the first connection. Errors never show the URL.
    pub fn endpoint(&self) -> crate::Result<PgEndpoint> {
        let e = PgEndpoint::new(self.database_url.clone());
        let e = match &self.pg_ca_file {
            Some(path) => e.with_ca_file(path)?,
            None => e,
        };
        e.config()?;
        Ok(e)
    }
}

/// Redis connection.
#[derive(Args, Clone, Debug)]
pub struct RedisArgs {
    /// Redis URL, e.g. redis://127.0.0.1:6379, or rediss://… for TLS (the URL
    /// a managed Redis such as Upstash shows), checked against the webpki roots.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: Redacted<String>,
    /// PEM file of the CA(s) that sign the Redis server's certificate, for a
    /// rediss:// URL to a server with a private CA; then only these are trusted.
    #[arg(long, env = "IBEX_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// The Redis is a Redis Cluster (self-managed, ElastiCache cluster mode):
    /// --redis-url is then a comma-separated list of seed nodes (one is
    /// enough), commands go to the master of their key's slot and the flush
    /// sweeps every master.
    #[arg(long, env = "IBEX_REDIS_CLUSTER")]
    pub redis_cluster: bool,
}

impl RedisArgs {
    /// The endpoint these flags name; reads the CA file. Errors never show the
    /// URL.
    pub fn endpoint(&self) -> crate::Result<RedisEndpoint> {
        let e =
            RedisEndpoint::new(self.redis_url.expose().clone()).with_cluster(self.redis_cluster);
        let e = match &self.redis_ca_file {
            Some(path) => e.with_ca_file(path)?,
            None => e,
        };
        // Fails now on a bad URL or a CA file beside a redis:// URL, not at the
        // first connection.
        e.client()?;
        if e.is_cluster() {
            e.cluster_client(std::time::Duration::from_secs(1))?;
        }
        Ok(e)
    }
}

/// `migrate` arguments.
#[derive(Args)]
pub struct MigrateArgs {
    /// Postgres connection.
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// `store` arguments.
#[derive(Args)]
pub struct StoreArgs {
    /// Address to listen on.
    #[arg(long, env = "IBEX_STORE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Postgres connection (the pool is forced read-only whatever the role).
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Maximum pooled Postgres connections.
    #[arg(long, env = "IBEX_STORE_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,
    /// Longest wait for a pooled or new connection, in milliseconds.
    #[arg(long, env = "IBEX_STORE_ACQUIRE_TIMEOUT_MS", default_value_t = 250)]
    pub acquire_timeout_ms: u64,
    /// Server-side statement_timeout of the pool, in milliseconds.
    #[arg(long, env = "IBEX_STORE_STATEMENT_TIMEOUT_MS", default_value_t = 400)]
    pub statement_timeout_ms: u64,
    /// Deadline of a whole lookup (acquire + query) before answering 503, in
    /// milliseconds. Keep it below the filter's store.timeout_ms (500).
    #[arg(long, env = "IBEX_STORE_LOOKUP_TIMEOUT_MS", default_value_t = 450)]
    pub lookup_timeout_ms: u64,
    /// Run every lookup on its own query instead of sharing one query among
    /// concurrent lookups of the same agent.
    #[arg(long, env = "IBEX_STORE_NO_SINGLE_FLIGHT")]
    pub no_single_flight: bool,
    /// Redis of the fleet (the one the subscribers tombstone), read only: a
    /// directive query already sent is then shared with later lookups of the
    /// same agent while Redis shows no invalidation of it since, so a fleet's
    /// cold start costs Postgres one query per agent. Needs the subscribers'
    /// tombstones (not `--tombstone-ttl 0`). Without it, no sent query is shared.
    #[arg(long, env = "IBEX_STORE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Redacted<String>>,
    /// The directive keys' prefix in that Redis (the filter's redis.key_prefix).
    #[arg(long, env = "IBEX_STORE_KEY_PREFIX", default_value = ibex_wire::DEFAULT_KEY_PREFIX)]
    pub key_prefix: String,
    /// How long after its answer a query may still be shared, in milliseconds;
    /// with --lookup-timeout-ms it must stay below the tombstone life (10 s).
    #[arg(long, env = "IBEX_STORE_SHARE_WINDOW_MS", default_value_t = 3000)]
    pub share_window_ms: u64,
}

/// Where `set-directive` reads the text from.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["content", "content_file", "content_stdin"])))]
pub struct ContentSource {
    /// The directive text itself (visible in the process list: prefer a file
    /// or stdin for anything sensitive).
    #[arg(long)]
    pub content: Option<Redacted<String>>,
    /// Read the directive text from this UTF-8 file, byte for byte.
    #[arg(long)]
    pub content_file: Option<PathBuf>,
    /// Read the directive text from standard input, byte for byte.
    #[arg(long)]
    pub content_stdin: bool,
}

impl ContentSource {
    /// Reads the text from whichever source was given. Errors name the source,
    /// never the text.
    pub fn read(&self) -> crate::Result<crate::DirectiveText> {
        use std::io::Read;
        let text = if let Some(text) = &self.content {
            text.expose().clone()
        } else if let Some(path) = &self.content_file {
            std::fs::read_to_string(path).map_err(|e| {
                crate::Error::InvalidInput(format!("cannot read {}: {e}", path.display()))
            })?
        } else {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| crate::Error::InvalidInput(format!("cannot read stdin: {e}")))?;
            text
        };
        Ok(crate::DirectiveText::new(text))
    }
}

/// `set-directive` arguments.
#[derive(Args)]
pub struct SetDirectiveArgs {
    /// Agent whose directive is set (created when missing).
    #[arg(long, env = "IBEX_AGENT_ID")]
    pub agent_id: Uuid,
    /// The new text.
    #[command(flatten)]
    pub source: ContentSource,
    /// Org of the agent when it has to be created (default: the demo org
    /// 00000000-0000-4000-8000-000000000001).
    #[arg(long, env = "IBEX_ORG_ID")]
    pub org_id: Option<Uuid>,
    /// Where the change is written and published.
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `clear-directive` arguments.
#[derive(Args)]
pub struct ClearDirectiveArgs {
    /// Agent whose directive is deactivated.
    #[arg(long, env = "IBEX_AGENT_ID")]
    pub agent_id: Uuid,
    /// Where the change is written and published.
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `history` arguments.
#[derive(Args)]
pub struct HistoryArgs {
    /// Agent whose directive versions are listed.
    #[arg(long, env = "IBEX_AGENT_ID")]
    pub agent_id: Uuid,
    /// Add a `content` column: each version's text as a JSON string (one line,
    /// control and invisible characters escaped; `jq -r` gives the exact text
    /// back). This prints governance text, the agent's system prompts, to
    /// stdout: mind where the output goes.
    // No env variable on purpose: printing directive text must be asked for on
    // the command line, never inherited from an environment.
    #[arg(long)]
    pub show_content: bool,
    /// Postgres connection (used read-only).
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// `activate` arguments.
#[derive(Args)]
pub struct ActivateArgs {
    /// The directive version to make active, as `history` and `set-directive`
    /// print it (its agent is found from it). Only from the command line: a
    /// variable left in the environment must not choose what a change activates.
    #[arg(long)]
    pub version_id: Uuid,
    /// Where the change is written and published.
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// Where a directive change is written (Postgres) and its update published
/// (Redis): the flags `set-directive`, `clear-directive`, `activate` and
/// `revoke-key` share.
#[derive(Args)]
pub struct ChangeArgs {
    /// Do not publish the update to Redis.
    #[arg(long)]
    pub no_publish: bool,
    /// Postgres connection.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Redis connection (for the publish).
    #[command(flatten)]
    pub redis: RedisArgs,
}

impl ChangeArgs {
    /// Where the update is published: `None` with `--no-publish`.
    pub fn publish_endpoint(&self) -> crate::Result<Option<RedisEndpoint>> {
        if self.no_publish {
            return Ok(None);
        }
        self.redis.endpoint().map(Some)
    }
}

/// `issue-key` arguments.
#[derive(Args)]
pub struct IssueKeyArgs {
    /// Agent the key identifies (created when missing).
    #[arg(long, env = "IBEX_AGENT_ID")]
    pub agent_id: Uuid,
    /// A note for `list-keys` (who or what holds the key); no control
    /// characters, at most 200 bytes.
    #[arg(long)]
    pub label: Option<String>,
    /// Org of the agent when it has to be created (default: the demo org
    /// 00000000-0000-4000-8000-000000000001).
    #[arg(long, env = "IBEX_ORG_ID")]
    pub org_id: Option<Uuid>,
    /// Postgres connection.
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// Which key `revoke-key` revokes.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("key").required(true).args(["key_sha256", "key_stdin"])))]
pub struct KeySelector {
    /// The key's SHA-256, 64 lower-case hex characters (as `list-keys` prints).
    // Checked by `KeySelector::resolve`, not by the parser, so that a key pasted
    // here by mistake is not echoed in the error. (A `//` comment: clap prints the
    // `///` lines as the flag's help.)
    #[arg(long)]
    pub key_sha256: Option<String>,
    /// Read the key itself from standard input (surrounding whitespace
    /// dropped) and revoke its SHA-256.
    #[arg(long)]
    pub key_stdin: bool,
}

impl KeySelector {
    /// The hash to revoke: the flag's, or that of the key read from stdin.
    /// Errors never quote the input.
    pub fn resolve(&self) -> crate::Result<KeySha256> {
        use std::io::Read;
        if let Some(raw) = &self.key_sha256 {
            // The message never quotes the value: it might be the key itself.
            return KeySha256::parse(raw).ok_or_else(|| {
                crate::Error::InvalidInput(
                    "--key-sha256 expects 64 lower-case hex characters (the key's SHA-256, \
                     not the key; use --key-stdin to pass the key)"
                        .into(),
                )
            });
        }
        let mut raw = String::new();
        std::io::stdin()
            .read_to_string(&mut raw)
            .map_err(|e| crate::Error::InvalidInput(format!("cannot read stdin: {e}")))?;
        Ok(ApiKey::from_input(&raw)?.sha256())
    }
}

/// `revoke-key` arguments.
#[derive(Args)]
pub struct RevokeKeyArgs {
    /// The key to revoke.
    #[command(flatten)]
    pub key: KeySelector,
    /// Where the revocation is written and published.
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `list-keys` arguments.
#[derive(Args)]
pub struct ListKeysArgs {
    /// Agent whose keys are listed.
    #[arg(long, env = "IBEX_AGENT_ID")]
    pub agent_id: Uuid,
    /// Postgres connection.
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// `flush` arguments.
#[derive(Args)]
pub struct FlushArgs {
    /// Redis connection.
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// `subscribe` arguments.
#[derive(Args, Debug)]
pub struct SubscribeArgs {
    /// Redis connection (pub/sub and key deletes).
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Base URLs of the Envoy control listeners, comma-separated.
    #[arg(
        long,
        env = "IBEX_CONTROL_URLS",
        value_delimiter = ',',
        required = true
    )]
    pub control_urls: Vec<String>,
    /// Bearer token the control listeners require.
    #[arg(long, env = "IBEX_CONTROL_TOKEN", hide_env_values = true)]
    pub control_token: Option<Redacted<String>>,
    /// Address of the subscriber's /healthz, /readyz and /metrics server.
    #[arg(long, env = "IBEX_SUBSCRIBE_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: SocketAddr,
    /// Prefix of the Redis directive keys (must match the filter's
    /// redis.key_prefix).
    #[arg(long, env = "IBEX_KEY_PREFIX", default_value = ibex_wire::DEFAULT_KEY_PREFIX)]
    pub key_prefix: String,
    /// How long the Redis tombstone of an updated agent (a `"\0"` value) and the
    /// flush markers `{prefix}__flush__{<slot tag>}` of a full flush live. While they do, the
    /// filter's conditional write-back cannot put old text back into Redis, so N
    /// must exceed the longest filter fill (its callout timeouts). 0 falls back
    /// to a plain DEL, which an in-flight write-back can undo.
    #[arg(long, env = "IBEX_TOMBSTONE_TTL_SECONDS", default_value_t = 10)]
    pub tombstone_ttl_seconds: u64,
    /// First retry delay per invalidation target, in milliseconds.
    #[arg(long, env = "IBEX_SUBSCRIBE_RETRY_INITIAL_MS", default_value_t = 10)]
    pub retry_initial_ms: u64,
    /// Largest retry delay, in milliseconds.
    #[arg(long, env = "IBEX_SUBSCRIBE_RETRY_MAX_MS", default_value_t = 1000)]
    pub retry_max_ms: u64,
    /// Give up on a target after this long, in milliseconds.
    #[arg(
        long,
        env = "IBEX_SUBSCRIBE_RETRY_DEADLINE_MS",
        default_value_t = 10000
    )]
    pub retry_deadline_ms: u64,
    /// Timeout of one control POST, in milliseconds.
    #[arg(
        long,
        env = "IBEX_SUBSCRIBE_REQUEST_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub request_timeout_ms: u64,
    /// Interval of the liveness PING on the subscription, in milliseconds.
    #[arg(long, env = "IBEX_SUBSCRIBE_PING_INTERVAL_MS", default_value_t = 5000)]
    pub ping_interval_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn content_sources_are_exclusive_and_required() {
        let id = "6f1c2a3b-0000-4000-8000-000000000001";
        let base = [
            "ibex-companion",
            "set-directive",
            "--agent-id",
            id,
            "--database-url",
            "postgres://x",
        ];
        assert!(Cli::try_parse_from(base).is_err());
        let mut both = base.to_vec();
        both.extend(["--content", "a", "--content-stdin"]);
        assert!(Cli::try_parse_from(both).is_err());
        let mut one = base.to_vec();
        one.extend(["--content", "a"]);
        let cli = Cli::try_parse_from(one).unwrap();
        let Command::SetDirective(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert!(!format!("{:?}", args.source).contains("\"a\""));
    }

    #[test]
    fn history_and_activate_take_uuids() {
        let id = "6f1c2a3b-0000-4000-8000-000000000001";
        let db = ["--database-url", "postgres://x"];
        let cli = Cli::try_parse_from(
            ["ibex-companion", "history", "--agent-id", id]
                .into_iter()
                .chain(db),
        )
        .unwrap();
        let Command::History(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(args.agent_id.to_string(), id);
        assert!(!args.show_content, "content is shown only when asked for");
        let cli = Cli::try_parse_from(
            [
                "ibex-companion",
                "activate",
                "--version-id",
                id,
                "--no-publish",
            ]
            .into_iter()
            .chain(db),
        )
        .unwrap();
        let Command::Activate(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(args.version_id.to_string(), id);
        assert!(args.change.publish_endpoint().unwrap().is_none());
        for bad in [
            vec!["ibex-companion", "history", "--agent-id", "nope"],
            vec!["ibex-companion", "activate", "--version-id", "nope"],
            vec!["ibex-companion", "activate"],
        ] {
            assert!(
                Cli::try_parse_from(bad.iter().copied().chain(db)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn revoke_key_takes_exactly_one_selector() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let base = [
            "ibex-companion",
            "revoke-key",
            "--database-url",
            "postgres://x",
        ];
        assert!(Cli::try_parse_from(base).is_err());
        let mut both = base.to_vec();
        both.extend(["--key-sha256", hash, "--key-stdin"]);
        assert!(Cli::try_parse_from(both).is_err());
        let mut one = base.to_vec();
        one.extend(["--key-sha256", hash]);
        let cli = Cli::try_parse_from(one).unwrap();
        let Command::RevokeKey(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(args.key.resolve().unwrap().hex(), hash);
        // A key passed where the hash belongs is refused without being echoed.
        let mut wrong = base.to_vec();
        wrong.extend(["--key-sha256", "ibex_secretsecret"]);
        let cli = Cli::try_parse_from(wrong).unwrap();
        let Command::RevokeKey(args) = cli.command else {
            panic!("wrong subcommand")
        };
        let err = args.key.resolve().unwrap_err().to_string();
        assert!(!err.contains("secretsecret"), "{err}");
    }

    #[test]
    fn rest_takes_exactly_one_token_source() {
        let base = ["ibex-companion", "rest"];
        assert!(Cli::try_parse_from(base).is_err());
        let mut both = base.to_vec();
        both.extend(["--token", "t", "--token-file", "/nonexistent"]);
        assert!(Cli::try_parse_from(both).is_err());
        let mut one = base.to_vec();
        one.extend(["--token", "tok-5e0f7a"]);
        let cli = Cli::try_parse_from(one).unwrap();
        let Command::Rest(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(args.listen.to_string(), "127.0.0.1:7380");
        assert_eq!(args.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(args.max_pipeline_commands, 1000);
        assert_eq!(args.max_command_args, 1024);
        assert_eq!(args.max_request_args, 16384);
        assert_eq!(args.redis_timeout_ms, 1000);
        assert_eq!(args.header_timeout_ms, 5000);
        assert_eq!(args.idle_timeout_ms, 60000);
        assert_eq!(args.body_timeout_ms, 10000);
        assert_eq!(args.max_connections, 1024);
        assert_eq!(args.shutdown_grace_ms, 5000);
        assert_eq!(args.key_prefix, ibex_wire::DEFAULT_KEY_PREFIX);
        assert!(!args.allow_any_script);
        assert_eq!(args.token.resolve().unwrap().expose(), "tok-5e0f7a");
        assert!(args.admin_token.resolve().unwrap().is_none());
        assert!(!format!("{args:?}").contains("tok-5e0f7a"));
        // Caps and deadlines of 0 are usage errors, not silently something else.
        for flag in [
            "--max-connections",
            "--max-pipeline-commands",
            "--max-command-args",
            "--max-request-args",
            "--header-timeout-ms",
            "--idle-timeout-ms",
            "--body-timeout-ms",
        ] {
            let mut zero = base.to_vec();
            zero.extend(["--token", "t", flag, "0"]);
            assert!(Cli::try_parse_from(zero).is_err(), "{flag} 0");
        }
        let mut empty = base.to_vec();
        empty.extend(["--token", ""]);
        let cli = Cli::try_parse_from(empty).unwrap();
        let Command::Rest(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert!(args
            .token
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }

    #[test]
    fn rest_admin_token_is_optional_and_takes_one_source() {
        let base = ["ibex-companion", "rest", "--token", "filter-tok"];
        let mut both = base.to_vec();
        both.extend(["--admin-token", "a", "--admin-token-file", "/nonexistent"]);
        assert!(Cli::try_parse_from(both).is_err());
        let mut one = base.to_vec();
        one.extend(["--admin-token", "adm-7c2e", "--key-prefix", "d:"]);
        let cli = Cli::try_parse_from(one).unwrap();
        let Command::Rest(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(
            args.admin_token.resolve().unwrap().unwrap().expose(),
            "adm-7c2e"
        );
        assert_eq!(args.key_prefix, "d:");
        assert!(!format!("{args:?}").contains("adm-7c2e"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin");
        std::fs::write(&path, "adm-file\n").unwrap();
        let mut file = base.to_vec();
        file.extend(["--admin-token-file", path.to_str().unwrap()]);
        let cli = Cli::try_parse_from(file).unwrap();
        let Command::Rest(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(
            args.admin_token.resolve().unwrap().unwrap().expose(),
            "adm-file"
        );
        std::fs::write(&path, "\n").unwrap();
        let err = args.admin_token.resolve().unwrap_err().to_string();
        assert!(err.contains("admin token is empty"), "{err}");
    }

    #[test]
    fn rest_token_file_drops_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let parse = |content: &str| {
            std::fs::write(&path, content).unwrap();
            let cli = Cli::try_parse_from([
                "ibex-companion",
                "rest",
                "--token-file",
                path.to_str().unwrap(),
            ])
            .unwrap();
            let Command::Rest(args) = cli.command else {
                panic!("wrong subcommand")
            };
            args.token.resolve()
        };
        assert_eq!(parse("abc\n").unwrap().expose(), "abc");
        assert_eq!(parse("abc\r\n").unwrap().expose(), "abc");
        assert_eq!(parse("abc").unwrap().expose(), "abc");
        assert!(parse("abc\n\n").is_err(), "only one newline is dropped");
        assert!(parse("\n").unwrap_err().to_string().contains("empty"));
        assert!(parse("").is_err());
    }

    #[test]
    fn control_urls_split_on_commas() {
        let cli = Cli::try_parse_from([
            "ibex-companion",
            "subscribe",
            "--control-urls",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--control-token",
            "tok",
        ])
        .unwrap();
        let Command::Subscribe(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(args.control_urls.len(), 2);
        assert!(!format!("{args:?}").contains("tok\""));
    }
}

/// A cap of at least 1: 0 would refuse everything, so it is a usage error
/// rather than a front that answers nothing.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected an integer of at least 1".into()),
    }
}

/// Reads a token file: its text with one trailing newline (`\n` or `\r\n`)
/// dropped. Errors name the file, never its content.
fn read_token_file(path: &std::path::Path, what: &str) -> crate::Result<Redacted<String>> {
    let mut text = std::fs::read_to_string(path).map_err(|e| {
        crate::Error::Config(format!(
            "cannot read the {what} file {}: {e}",
            path.display()
        ))
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(Redacted::new(text))
}

/// Where the REST front's filter token comes from: exactly one of the two.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("token_source").required(true).args(["token", "token_file"])))]
pub struct TokenSource {
    /// The filter's bearer token (`Authorization: Bearer …` or `?_token=…`):
    /// the one in the filter's redis.token. It runs only PING, GET and EVAL of
    /// the filter's scripts, on the filter's keys ({key-prefix}… and
    /// agent_key:…). Visible in the process list: prefer the environment or
    /// --token-file.
    #[arg(long, env = "IBEX_REDIS_REST_TOKEN", hide_env_values = true)]
    pub token: Option<Redacted<String>>,
    /// Read the filter's bearer token from this file (one trailing newline is
    /// dropped).
    #[arg(long, env = "IBEX_REDIS_REST_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl TokenSource {
    /// The token, from whichever source was given; refused when empty or not
    /// printable ASCII. Errors name the source, never the token.
    pub fn resolve(&self) -> crate::Result<Redacted<String>> {
        let token = if let Some(token) = &self.token {
            token.clone()
        } else if let Some(path) = &self.token_file {
            read_token_file(path, "token")?
        } else {
            return Err(crate::Error::Config("no REST token given".into()));
        };
        crate::rest::check_token(token.expose())?;
        Ok(token)
    }
}

/// Where the REST front's admin token comes from: one of the two, or neither
/// (then only the filter's token is served).
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("admin_token_source").args(["admin_token", "admin_token_file"])))]
pub struct AdminTokenSource {
    /// The operators' bearer token (Upstash SDKs, curl): GET, SET (with EX),
    /// DEL, EVAL of the filter's scripts (any with --allow-any-script) and
    /// PING, on any key. Never give it to the filter. Visible in the process
    /// list: prefer the environment or --admin-token-file.
    #[arg(long, env = "IBEX_REDIS_REST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Redacted<String>>,
    /// Read the admin token from this file (one trailing newline is dropped).
    #[arg(long, env = "IBEX_REDIS_REST_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

impl AdminTokenSource {
    /// The admin token if one was given; refused when empty or not printable
    /// ASCII. Errors name the source, never the token.
    pub fn resolve(&self) -> crate::Result<Option<Redacted<String>>> {
        let token = if let Some(token) = &self.admin_token {
            token.clone()
        } else if let Some(path) = &self.admin_token_file {
            read_token_file(path, "admin token")?
        } else {
            return Ok(None);
        };
        crate::rest::check_token_named(token.expose(), "REST admin token")?;
        Ok(Some(token))
    }
}

/// `rest` arguments.
#[derive(Args, Debug)]
pub struct RestArgs {
    /// Address to listen on.
    #[arg(long, env = "IBEX_REST_LISTEN", default_value = "127.0.0.1:7380")]
    pub listen: SocketAddr,
    /// Redis connection (one multiplexed connection, reconnected by itself).
    #[command(flatten)]
    pub redis: RedisArgs,
    /// The filter's token.
    #[command(flatten)]
    pub token: TokenSource,
    /// The operators' token.
    #[command(flatten)]
    pub admin_token: AdminTokenSource,
    /// Prefix of the Redis directive keys (must match the filter's
    /// redis.key_prefix): with agent_key:, the keys the filter's token reaches.
    #[arg(long, env = "IBEX_KEY_PREFIX", default_value = ibex_wire::DEFAULT_KEY_PREFIX)]
    pub key_prefix: String,
    /// Larger request bodies are refused with 413. The filter's largest body is
    /// a write-back: its directive escaped as a JSON string (up to 6 bytes per
    /// byte of text for control characters, 1 for ordinary text) plus about 200
    /// bytes; 4 MiB fits a directive of 600 KiB of the worst text, while a client
    /// cannot make the front buffer much.
    #[arg(long, env = "IBEX_REST_MAX_BODY_BYTES", default_value_t = crate::rest::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Most commands in one /pipeline (400 past it, before any runs). The filter
    /// sends no pipelines; a long one holds Redis, single-threaded, while every
    /// other client (the filter's 50 ms L2 reads included) waits.
    #[arg(long, env = "IBEX_REST_MAX_PIPELINE_COMMANDS", default_value_t = crate::rest::command::DEFAULT_MAX_PIPELINE_COMMANDS, value_parser = at_least_one)]
    pub max_pipeline_commands: usize,
    /// Most elements of one command, its name included (400 past it). The
    /// filter's largest command has 7.
    #[arg(long, env = "IBEX_REST_MAX_COMMAND_ARGS", default_value_t = crate::rest::command::DEFAULT_MAX_COMMAND_ARGS, value_parser = at_least_one)]
    pub max_command_args: usize,
    /// Most elements of all of one request's commands together (400 past it):
    /// bounds a pipeline of long commands.
    #[arg(long, env = "IBEX_REST_MAX_REQUEST_ARGS", default_value_t = crate::rest::command::DEFAULT_MAX_REQUEST_ARGS, value_parser = at_least_one)]
    pub max_request_args: usize,
    /// Let the admin token run any EVAL script (needs --admin-token). Without
    /// it only the filter's scripts (ibex_wire::FILTER_SCRIPTS, exact text) run,
    /// so a leaked token cannot run Lua of its own (redis.call('FLUSHALL'),
    /// CONFIG SET…). The filter's token never runs another script.
    #[arg(long, env = "IBEX_REST_ALLOW_ANY_SCRIPT")]
    pub allow_any_script: bool,
    /// Deadline of one Redis round trip (connecting included; a whole
    /// pipeline), in milliseconds; past it the request answers 503.
    #[arg(long, env = "IBEX_REST_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,
    /// Longest a request's headers may take to arrive, in milliseconds, from
    /// the connection's opening or from the first byte after the previous
    /// answer; then the connection is closed.
    #[arg(long, env = "IBEX_REST_HEADER_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,
    /// Longest a keep-alive connection may wait for its next request (or an
    /// answer wait for its reader), in milliseconds; then it is closed. Keep it
    /// above the filter's traffic gaps so Envoy reuses its connections.
    #[arg(long, env = "IBEX_REST_IDLE_TIMEOUT_MS", default_value_t = 60000, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,
    /// Deadline of reading a request's body, in milliseconds; past it the
    /// request answers 408 and the connection is closed.
    #[arg(long, env = "IBEX_REST_BODY_TIMEOUT_MS", default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_ms: u64,
    /// Most client connections open at once; a connection past it is accepted
    /// and closed at once, so its client fails fast (lowered to fit the
    /// open-file limit when that cannot be raised enough).
    #[arg(long, env = "IBEX_REST_MAX_CONNECTIONS", default_value_t = crate::rest::serve::DEFAULT_MAX_CONNECTIONS, value_parser = at_least_one)]
    pub max_connections: usize,
    /// On SIGTERM, how long in-flight requests may take to finish, in
    /// milliseconds; connections still open then are closed and the process
    /// exits.
    #[arg(long, env = "IBEX_REST_SHUTDOWN_GRACE_MS", default_value_t = 5000)]
    pub shutdown_grace_ms: u64,
}
