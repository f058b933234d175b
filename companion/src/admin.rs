//! Operator helpers: set or clear an agent's directive, list its versions
//! ([`history`], which maps a version id from the audit trail to its text) and
//! make an existing version active again ([`activate`]), and publish the
//! invalidation that tells every cache about a change; issue, revoke and list
//! an agent's gateway API keys (SPEC §3.1).
//!
//! Order matters: Postgres is committed first, then the update is published,
//! so any reader woken by the message sees the new row. A failed publish leaves
//! the committed change in place and is reported as [`AdminError::Publish`].
//! Content goes to Postgres as a bind parameter and nowhere else: not to logs,
//! not to stdout. The one way back out is [`history`] with content asked for,
//! whose caller prints it on the operator's request; it is never logged.
//!
//! Keys: only their SHA-256 reaches Postgres, a log line or a channel name. The
//! key itself is returned to the caller of [`issue_key`] (which prints it once)
//! and never kept.

use std::time::Duration;

use uuid::Uuid;

use crate::db::PgEndpoint;
use crate::keys::{ApiKey, KeySha256};
use crate::redis_conn::RedisEndpoint;
use crate::{db, DbFailure, DirectiveText, Error, Result};

/// Org id given to agents created by `set-directive` without `--org-id`.
pub const DEMO_ORG_ID: Uuid = Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001);

/// How long admin commands wait for Postgres or Redis before giving up.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Outcome of an admin command whose database part may have succeeded.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Nothing was changed.
    #[error(transparent)]
    Failed(#[from] Error),
    /// The database change is committed, but the invalidation was not
    /// published: caches keep the old directive until their TTL ends.
    #[error("database change committed but the invalidation was not published: {0}")]
    Publish(Error),
    /// A key was revoked in Postgres, but the invalidation was not published:
    /// caches may accept the key until their TTL ends.
    #[error("key revoked in the database but the invalidation was not published: {0}")]
    KeyPublish(Error),
}

/// Result of [`set_directive`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetOutcome {
    /// The directive row that now holds the active version.
    pub directive_id: Uuid,
    /// The newly inserted version.
    pub version_id: Uuid,
}

/// Makes `content` the active directive of `agent_id` in one transaction,
/// creating the agent (in `org_id`) and the directive row when missing.
pub async fn write_directive(
    database: impl Into<PgEndpoint>,
    agent_id: Uuid,
    org_id: Uuid,
    content: &DirectiveText,
) -> Result<SetOutcome> {
    if content.is_empty() {
        // The empty string means "no directive" in Redis (SPEC §4); storing
        // it would be indistinguishable from clearing.
        return Err(Error::InvalidInput(
            "directive content is empty; use clear-directive to remove a directive".into(),
        ));
    }
    let mut client = db::connect(database, ADMIN_TIMEOUT).await?;
    let tx = client.transaction().await.map_err(DbFailure::from)?;
    tx.execute(
        "INSERT INTO ibex_core.agents (id, org_id) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        &[&agent_id, &org_id],
    )
    .await
    .map_err(DbFailure::from)?;
    // Serialises concurrent writers of the same agent, so two of them cannot
    // both create a directive and trip the one-active-per-agent index.
    tx.execute(
        "SELECT 1 FROM ibex_core.agents WHERE id = $1 FOR UPDATE",
        &[&agent_id],
    )
    .await
    .map_err(DbFailure::from)?;
    let existing = tx
        .query_opt(
            "SELECT id FROM ibex_core.directives WHERE agent_id = $1 \
             ORDER BY is_active DESC, updated_at DESC LIMIT 1",
            &[&agent_id],
        )
        .await
        .map_err(DbFailure::from)?;
    let directive_id: Uuid = match existing {
        Some(row) => row.try_get(0).map_err(DbFailure::from)?,
        None => tx
            .query_one(
                "INSERT INTO ibex_core.directives (agent_id, is_active) VALUES ($1, false) RETURNING id",
                &[&agent_id],
            )
            .await
            .map_err(DbFailure::from)?
            .try_get(0)
            .map_err(DbFailure::from)?,
    };
    let version_id: Uuid = tx
        .query_one(
            "INSERT INTO ibex_core.directive_versions (directive_id, content) VALUES ($1, $2) RETURNING id",
            &[&directive_id, &content.expose()],
        )
        .await
        .map_err(DbFailure::from)?
        .try_get(0)
        .map_err(DbFailure::from)?;
    tx.execute(
        "UPDATE ibex_core.directives SET active_version_id = $2, is_active = true, updated_at = now() \
         WHERE id = $1",
        &[&directive_id, &version_id],
    )
    .await
    .map_err(DbFailure::from)?;
    tx.commit().await.map_err(DbFailure::from)?;
    tracing::info!(agent_id = %agent_id, %directive_id, %version_id, content_bytes = content.len(), "directive set");
    Ok(SetOutcome {
        directive_id,
        version_id,
    })
}

/// Deactivates the agent's directive; returns how many rows changed (0 or 1).
pub async fn deactivate_directive(database: impl Into<PgEndpoint>, agent_id: Uuid) -> Result<u64> {
    let client = db::connect(database, ADMIN_TIMEOUT).await?;
    let n = client
        .execute(
            "UPDATE ibex_core.directives SET is_active = false, updated_at = now() \
             WHERE agent_id = $1 AND is_active",
            &[&agent_id],
        )
        .await
        .map_err(DbFailure::from)?;
    tracing::info!(agent_id = %agent_id, deactivated = n, "directive cleared");
    Ok(n)
}

/// Publishes on `channel` when a Redis endpoint is given; `None` publishes
/// nothing (the caller's writer announces the change itself).
async fn publish_if(redis: Option<&RedisEndpoint>, channel: &str) -> Result<()> {
    if let Some(redis) = redis {
        publish(redis, channel).await?;
    }
    Ok(())
}

/// `PUBLISH channel ""`; returns the number of subscribers that received it.
pub async fn publish(redis: &RedisEndpoint, channel: &str) -> Result<i64> {
    let client = redis.client()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(ADMIN_TIMEOUT)
        .set_response_timeout(ADMIN_TIMEOUT);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg("")
        .query_async(&mut conn)
        .await?;
    tracing::info!(channel, receivers, "published");
    Ok(receivers)
}

/// `set-directive`: write, then publish the agent's update unless `redis` is
/// `None`.
pub async fn set_directive(
    database: impl Into<PgEndpoint>,
    redis: Option<&RedisEndpoint>,
    agent_id: Uuid,
    org_id: Uuid,
    content: &DirectiveText,
) -> Result<SetOutcome, AdminError> {
    let outcome = write_directive(database, agent_id, org_id, content).await?;
    publish_if(redis, &ibex_wire::updates_channel(agent_id))
        .await
        .map_err(AdminError::Publish)?;
    Ok(outcome)
}

/// `clear-directive`: deactivate, then publish the agent's update unless
/// `redis` is `None`.
pub async fn clear_directive(
    database: impl Into<PgEndpoint>,
    redis: Option<&RedisEndpoint>,
    agent_id: Uuid,
) -> Result<u64, AdminError> {
    let n = deactivate_directive(database, agent_id).await?;
    publish_if(redis, &ibex_wire::updates_channel(agent_id))
        .await
        .map_err(AdminError::Publish)?;
    Ok(n)
}

/// UTC timestamps with microseconds, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (RFC 3339):
/// precise enough to order versions written within one second and to line
/// them up with access-log times.
const UTC_MICROS: &str = "YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"";

/// One row of [`history`]: a version of one of the agent's directives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRow {
    /// The `directive_versions` id (what the store answers as `version_id`).
    pub version_id: Uuid,
    /// When it was written, UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
    pub created_at: String,
    /// True for the active version of the agent's active directive: the one
    /// the store serves.
    pub active: bool,
    /// Length of the text in bytes (`octet_length`).
    pub bytes: i32,
    /// The text, only when asked for (redacted in `Debug`).
    pub content: Option<DirectiveText>,
}

impl VersionRow {
    /// The row as `history` prints it: `version_id  created_at  active  bytes`
    /// tab-separated (`active` is `yes` or `-`), then the content as one
    /// escaped JSON string ([`DirectiveText::to_terminal_json`]) when it was
    /// read, so no text can add a column, a line or a terminal escape. For
    /// stdout only.
    pub fn to_line(&self) -> String {
        let active = if self.active { "yes" } else { "-" };
        let mut line = format!(
            "{}\t{}\t{active}\t{}",
            self.version_id, self.created_at, self.bytes
        );
        if let Some(content) = &self.content {
            line.push('\t');
            line.push_str(&content.to_terminal_json());
        }
        line
    }
}

/// The header line of `history`, with or without the content column.
pub fn history_header(with_content: bool) -> &'static str {
    if with_content {
        "version_id\tcreated_at\tactive\tbytes\tcontent"
    } else {
        "version_id\tcreated_at\tactive\tbytes"
    }
}

/// `history`: every version of the agent's directive(s), newest first (ties,
/// which one transaction's versions would be, by id); the text only when
/// `with_content`, otherwise it is not even read. An agent without directives
/// has no rows. Runs in a read-only transaction: it cannot change anything.
pub async fn history(
    database: impl Into<PgEndpoint>,
    agent_id: Uuid,
    with_content: bool,
) -> Result<Vec<VersionRow>> {
    let mut client = db::connect(database, ADMIN_TIMEOUT).await?;
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(DbFailure::from)?;
    let rows = tx
        .query(
            &format!(
                "SELECT dv.id, \
                 to_char(dv.created_at AT TIME ZONE 'UTC', '{UTC_MICROS}'), \
                 COALESCE(d.is_active AND d.active_version_id = dv.id, false), \
                 octet_length(dv.content), \
                 CASE WHEN $2::boolean THEN dv.content END \
                 FROM ibex_core.directive_versions dv \
                 JOIN ibex_core.directives d ON d.id = dv.directive_id \
                 WHERE d.agent_id = $1 \
                 ORDER BY dv.created_at DESC, dv.id DESC"
            ),
            &[&agent_id, &with_content],
        )
        .await
        .map_err(DbFailure::from)?;
    tx.commit().await.map_err(DbFailure::from)?;
    let versions = rows
        .iter()
        .map(|row| {
            Ok(VersionRow {
                version_id: row.try_get(0).map_err(DbFailure::from)?,
                created_at: row.try_get(1).map_err(DbFailure::from)?,
                active: row.try_get(2).map_err(DbFailure::from)?,
                bytes: row.try_get(3).map_err(DbFailure::from)?,
                content: row
                    .try_get::<_, Option<String>>(4)
                    .map_err(DbFailure::from)?
                    .map(DirectiveText::new),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    tracing::info!(agent_id = %agent_id, versions = versions.len(), with_content, "history listed");
    Ok(versions)
}

/// Result of [`activate_version`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActivateOutcome {
    /// The agent whose directive the version belongs to.
    pub agent_id: Uuid,
    /// The directive row that now holds it as its active version.
    pub directive_id: Uuid,
    /// The version, now active.
    pub version_id: Uuid,
    /// True when it already was the active version of the active directive:
    /// nothing was written.
    pub already_active: bool,
}

/// Makes the existing version `version_id` its agent's active directive in
/// one transaction: its directive gets `active_version_id = version_id`,
/// `is_active = true`; any other active directive of the agent is deactivated
/// first (one active directive per agent). Works in both directions (an older
/// version: a rollback; a newer one: a roll forward) and on a cleared
/// directive (it is reactivated). An unknown version is an error and changes
/// nothing; the version already active is a success that writes nothing.
pub async fn activate_version(
    database: impl Into<PgEndpoint>,
    version_id: Uuid,
) -> Result<ActivateOutcome> {
    let mut client = db::connect(database, ADMIN_TIMEOUT).await?;
    let tx = client.transaction().await.map_err(DbFailure::from)?;
    // A version never moves to another directive, nor a directive to another
    // agent, so this read needs no lock.
    let found = tx
        .query_opt(
            "SELECT d.id, d.agent_id FROM ibex_core.directive_versions dv \
             JOIN ibex_core.directives d ON d.id = dv.directive_id WHERE dv.id = $1",
            &[&version_id],
        )
        .await
        .map_err(DbFailure::from)?;
    let Some(found) = found else {
        // Dropping the transaction rolls it back; nothing was written anyway.
        return Err(Error::InvalidInput(
            "no directive version has this id (see `history --agent-id …`)".into(),
        ));
    };
    let directive_id: Uuid = found.try_get(0).map_err(DbFailure::from)?;
    let agent_id: Uuid = found.try_get(1).map_err(DbFailure::from)?;
    // The agent row first, as set-directive locks it, so the two serialise on
    // one agent and always take their locks in the same order (agent, then
    // directive): no deadlock between them.
    tx.execute(
        "SELECT 1 FROM ibex_core.agents WHERE id = $1 FOR UPDATE",
        &[&agent_id],
    )
    .await
    .map_err(DbFailure::from)?;
    // Read under the row lock: a clear-directive or another activate that
    // committed meanwhile is seen, none can commit until we do.
    let current = tx
        .query_one(
            "SELECT is_active AND active_version_id IS NOT DISTINCT FROM $2 \
             FROM ibex_core.directives WHERE id = $1 FOR UPDATE",
            &[&directive_id, &version_id],
        )
        .await
        .map_err(DbFailure::from)?;
    let already_active: bool = current.try_get(0).map_err(DbFailure::from)?;
    if !already_active {
        // The partial unique index allows one active directive per agent:
        // another one (written by other means than set-directive, which reuses
        // one row) must give way before this one is activated.
        tx.execute(
            "UPDATE ibex_core.directives SET is_active = false, updated_at = now() \
             WHERE agent_id = $1 AND is_active AND id <> $2",
            &[&agent_id, &directive_id],
        )
        .await
        .map_err(DbFailure::from)?;
        tx.execute(
            "UPDATE ibex_core.directives \
             SET active_version_id = $2, is_active = true, updated_at = now() WHERE id = $1",
            &[&directive_id, &version_id],
        )
        .await
        .map_err(DbFailure::from)?;
    }
    tx.commit().await.map_err(DbFailure::from)?;
    tracing::info!(agent_id = %agent_id, %directive_id, %version_id, already_active, "directive version activated");
    Ok(ActivateOutcome {
        agent_id,
        directive_id,
        version_id,
        already_active,
    })
}

/// `activate`: make the version active, then publish its agent's update
/// unless `redis` is `None`, exactly as `set-directive` does.
///
/// The version already active is published too: nothing changed in Postgres,
/// but running `activate` again is then how an operator repairs an earlier
/// change whose publish failed (exit 3), and an extra update costs one refill
/// of one agent's entries.
pub async fn activate(
    database: impl Into<PgEndpoint>,
    redis: Option<&RedisEndpoint>,
    version_id: Uuid,
) -> Result<ActivateOutcome, AdminError> {
    let outcome = activate_version(database, version_id).await?;
    publish_if(redis, &ibex_wire::updates_channel(outcome.agent_id))
        .await
        .map_err(AdminError::Publish)?;
    Ok(outcome)
}

/// Longest `--label` of a key, in bytes.
pub const MAX_LABEL_BYTES: usize = 200;

/// Result of [`issue_key`]. `key` is the only copy of the key in clear.
#[derive(Debug)]
pub struct IssuedKey {
    /// The new key (redacted in `Debug`); print it once, keep it nowhere.
    pub key: ApiKey,
    /// Its SHA-256, the row's primary key.
    pub key_sha256: KeySha256,
}

/// Creates a new random key for `agent_id` (creating the agent in `org_id`
/// when missing, like `set-directive`) and stores only its SHA-256. Nothing to
/// publish: no cache can hold an entry for a key that did not exist.
pub async fn issue_key(
    database: impl Into<PgEndpoint>,
    agent_id: Uuid,
    org_id: Uuid,
    label: Option<&str>,
) -> Result<IssuedKey> {
    if let Some(label) = label {
        if label.len() > MAX_LABEL_BYTES || label.chars().any(char::is_control) {
            return Err(Error::InvalidInput(format!(
                "a key label must be at most {MAX_LABEL_BYTES} bytes without control characters"
            )));
        }
    }
    let key = ApiKey::generate()?;
    let key_sha256 = key.sha256();
    let mut client = db::connect(database, ADMIN_TIMEOUT).await?;
    let tx = client.transaction().await.map_err(DbFailure::from)?;
    tx.execute(
        "INSERT INTO ibex_core.agents (id, org_id) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        &[&agent_id, &org_id],
    )
    .await
    .map_err(DbFailure::from)?;
    let digest: &[u8] = &key_sha256.0;
    tx.execute(
        "INSERT INTO ibex_core.agent_api_keys (key_sha256, agent_id, label) VALUES ($1, $2, $3)",
        &[&digest, &agent_id, &label],
    )
    .await
    .map_err(DbFailure::from)?;
    tx.commit().await.map_err(DbFailure::from)?;
    tracing::info!(agent_id = %agent_id, "api key issued");
    tracing::debug!(agent_id = %agent_id, key_sha256 = %key_sha256, "api key issued");
    Ok(IssuedKey { key, key_sha256 })
}

/// Result of [`revoke_key`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// The agent the key belonged to.
    pub agent_id: Uuid,
    /// False when the key was already revoked (its `revoked_at` is kept).
    pub newly_revoked: bool,
}

/// Sets the key's `revoked_at` (kept when already set: idempotent). An
/// unknown hash is an error.
pub async fn deactivate_key(
    database: impl Into<PgEndpoint>,
    key: KeySha256,
) -> Result<RevokeOutcome> {
    let client = db::connect(database, ADMIN_TIMEOUT).await?;
    let digest: &[u8] = &key.0;
    let row = client
        .query_opt(
            "UPDATE ibex_core.agent_api_keys k \
             SET revoked_at = COALESCE(k.revoked_at, now()) \
             FROM ibex_core.agent_api_keys old \
             WHERE k.key_sha256 = $1 AND old.key_sha256 = k.key_sha256 \
             RETURNING k.agent_id, old.revoked_at IS NULL",
            &[&digest],
        )
        .await
        .map_err(DbFailure::from)?;
    let Some(row) = row else {
        return Err(Error::InvalidInput("no API key has this SHA-256".into()));
    };
    let outcome = RevokeOutcome {
        agent_id: row.try_get(0).map_err(DbFailure::from)?,
        newly_revoked: row.try_get(1).map_err(DbFailure::from)?,
    };
    tracing::info!(agent_id = %outcome.agent_id, newly_revoked = outcome.newly_revoked, "api key revoked");
    tracing::debug!(key_sha256 = %key, "api key revoked");
    Ok(outcome)
}

/// `revoke-key`: revoke, then publish `ibex:agent_key:updates:{sha256hex}`
/// unless `redis` is `None` (also for a key already revoked: publishing
/// again is harmless and repairs an earlier failed publish).
pub async fn revoke_key(
    database: impl Into<PgEndpoint>,
    redis: Option<&RedisEndpoint>,
    key: KeySha256,
) -> Result<RevokeOutcome, AdminError> {
    let outcome = deactivate_key(database, key).await?;
    publish_if(redis, &ibex_wire::key_updates_channel(&key.hex()))
        .await
        .map_err(AdminError::KeyPublish)?;
    Ok(outcome)
}

/// One row of [`list_keys`]; never the key itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRow {
    /// The key's SHA-256.
    pub key_sha256: KeySha256,
    /// The operator's label, if any.
    pub label: Option<String>,
    /// When it was issued, UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub created_at: String,
    /// When it was revoked, same format; `None` while active.
    pub revoked_at: Option<String>,
}

/// `list-keys`: the agent's keys, oldest first.
pub async fn list_keys(database: impl Into<PgEndpoint>, agent_id: Uuid) -> Result<Vec<KeyRow>> {
    const UTC: &str = "YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"";
    let client = db::connect(database, ADMIN_TIMEOUT).await?;
    let rows = client
        .query(
            &format!(
                "SELECT key_sha256, label, \
                 to_char(created_at AT TIME ZONE 'UTC', '{UTC}'), \
                 to_char(revoked_at AT TIME ZONE 'UTC', '{UTC}') \
                 FROM ibex_core.agent_api_keys WHERE agent_id = $1 \
                 ORDER BY created_at, key_sha256"
            ),
            &[&agent_id],
        )
        .await
        .map_err(DbFailure::from)?;
    rows.iter()
        .map(|row| {
            let digest: Vec<u8> = row.try_get(0).map_err(DbFailure::from)?;
            Ok(KeyRow {
                key_sha256: KeySha256::from_bytes(&digest).ok_or_else(|| {
                    Error::InvalidInput("a stored key hash is not 32 bytes".into())
                })?,
                label: row.try_get(1).map_err(DbFailure::from)?,
                created_at: row.try_get(2).map_err(DbFailure::from)?,
                revoked_at: row.try_get(3).map_err(DbFailure::from)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_org_is_a_stable_v4_uuid() {
        assert_eq!(
            DEMO_ORG_ID.to_string(),
            "00000000-0000-4000-8000-000000000001"
        );
        assert_eq!(DEMO_ORG_ID.get_version_num(), 4);
    }

    #[test]
    fn history_lines_keep_their_columns() {
        let mut row = VersionRow {
            version_id: Uuid::nil(),
            created_at: "2025-01-02T03:04:05.000006Z".into(),
            active: true,
            bytes: 7,
            content: None,
        };
        assert_eq!(
            row.to_line(),
            "00000000-0000-0000-0000-000000000000\t2025-01-02T03:04:05.000006Z\tyes\t7"
        );
        assert_eq!(history_header(false).split('\t').count(), 4);
        row.active = false;
        row.content = Some(DirectiveText::new("a\tb\nc"));
        assert_eq!(
            row.to_line(),
            "00000000-0000-0000-0000-000000000000\t2025-01-02T03:04:05.000006Z\t-\t7\t\"a\\tb\\nc\""
        );
        assert_eq!(history_header(true).split('\t').count(), 5);
    }

    #[tokio::test]
    async fn empty_content_is_rejected_before_connecting() {
        let err = write_directive(
            "postgres://127.0.0.1:1/none",
            Uuid::nil(),
            DEMO_ORG_ID,
            &DirectiveText::new(""),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)));
    }

    #[tokio::test]
    async fn bad_labels_are_rejected_before_connecting() {
        for label in [
            "a\tb".to_string(),
            "x\n".into(),
            "l".repeat(MAX_LABEL_BYTES + 1),
        ] {
            let err = issue_key(
                "postgres://127.0.0.1:1/none",
                Uuid::nil(),
                DEMO_ORG_ID,
                Some(&label),
            )
            .await
            .unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{label:?}");
        }
    }
}
