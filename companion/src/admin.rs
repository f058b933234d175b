//! Operator helpers: set or clear an agent's directive, and publish the
//! invalidation that tells every cache about it; issue, revoke and list an
//! agent's gateway API keys (SPEC §3.1).
//!
//! Order matters: Postgres is committed first, then the update is published,
//! so any reader woken by the message sees the new row. A failed publish leaves
//! the committed change in place and is reported as [`AdminError::Publish`].
//! Content goes to Postgres as a bind parameter and nowhere else: not to logs,
//! not to stdout.
//!
//! Keys: only their SHA-256 reaches Postgres, a log line or a channel name. The
//! key itself is returned to the caller of [`issue_key`] (which prints it once)
//! and never kept.

use std::time::Duration;

use uuid::Uuid;

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
    database_url: &str,
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
    let mut client = db::connect(database_url, ADMIN_TIMEOUT).await?;
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
pub async fn deactivate_directive(database_url: &str, agent_id: Uuid) -> Result<u64> {
    let client = db::connect(database_url, ADMIN_TIMEOUT).await?;
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
    database_url: &str,
    redis: Option<&RedisEndpoint>,
    agent_id: Uuid,
    org_id: Uuid,
    content: &DirectiveText,
) -> Result<SetOutcome, AdminError> {
    let outcome = write_directive(database_url, agent_id, org_id, content).await?;
    publish_if(redis, &ibex_wire::updates_channel(agent_id))
        .await
        .map_err(AdminError::Publish)?;
    Ok(outcome)
}

/// `clear-directive`: deactivate, then publish the agent's update unless
/// `redis` is `None`.
pub async fn clear_directive(
    database_url: &str,
    redis: Option<&RedisEndpoint>,
    agent_id: Uuid,
) -> Result<u64, AdminError> {
    let n = deactivate_directive(database_url, agent_id).await?;
    publish_if(redis, &ibex_wire::updates_channel(agent_id))
        .await
        .map_err(AdminError::Publish)?;
    Ok(n)
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
    database_url: &str,
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
    let mut client = db::connect(database_url, ADMIN_TIMEOUT).await?;
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
pub async fn deactivate_key(database_url: &str, key: KeySha256) -> Result<RevokeOutcome> {
    let client = db::connect(database_url, ADMIN_TIMEOUT).await?;
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
    database_url: &str,
    redis: Option<&RedisEndpoint>,
    key: KeySha256,
) -> Result<RevokeOutcome, AdminError> {
    let outcome = deactivate_key(database_url, key).await?;
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
pub async fn list_keys(database_url: &str, agent_id: Uuid) -> Result<Vec<KeyRow>> {
    const UTC: &str = "YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"";
    let client = db::connect(database_url, ADMIN_TIMEOUT).await?;
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
