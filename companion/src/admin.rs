//! Operator helpers: set or clear an agent's directive, and publish the
//! invalidation that tells every cache about it.
//!
//! Order matters: Postgres is committed first, then the update is published,
//! so any reader woken by the message sees the new row. A failed publish leaves
//! the committed change in place and is reported as [`AdminError::Publish`].
//! Content goes to Postgres as a bind parameter and nowhere else: not to logs,
//! not to stdout.

use std::time::Duration;

use uuid::Uuid;

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

/// `PUBLISH channel ""`; returns the number of subscribers that received it.
pub async fn publish(redis_url: &str, channel: &str) -> Result<i64> {
    let client = redis::Client::open(redis_url)
        .map_err(|_| Error::Config("REDIS_URL is not a valid Redis URL".into()))?;
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

/// `set-directive`: write, then publish the agent's update unless `redis_url`
/// is `None`.
pub async fn set_directive(
    database_url: &str,
    redis_url: Option<&str>,
    agent_id: Uuid,
    org_id: Uuid,
    content: &DirectiveText,
) -> Result<SetOutcome, AdminError> {
    let outcome = write_directive(database_url, agent_id, org_id, content).await?;
    if let Some(url) = redis_url {
        publish(url, &ibex_wire::updates_channel(agent_id))
            .await
            .map_err(AdminError::Publish)?;
    }
    Ok(outcome)
}

/// `clear-directive`: deactivate, then publish the agent's update unless
/// `redis_url` is `None`.
pub async fn clear_directive(
    database_url: &str,
    redis_url: Option<&str>,
    agent_id: Uuid,
) -> Result<u64, AdminError> {
    let n = deactivate_directive(database_url, agent_id).await?;
    if let Some(url) = redis_url {
        publish(url, &ibex_wire::updates_channel(agent_id))
            .await
            .map_err(AdminError::Publish)?;
    }
    Ok(n)
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
}
