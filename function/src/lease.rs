//! The broker's token as a lease on a stage's keys.
//!
//! A function's keys come with a signed `FunctionToken` whose `expires_at_ms` the broker
//! sets from its `token_lifetime_ms`. Halfway to that expiry the function attests again
//! (the cold start's path, with its backoff while the broker is unreachable) and, if the
//! broker releases the same stage key for the same version, takes the new token and its
//! later expiry. If the lease runs out first, or the broker refuses (a revoked model, a
//! changed policy) or releases other keys (a rotation), the function stops: the process
//! exits, dropping its keys with it, and the platform replaces it with a function whose
//! cold start attests afresh (and waits for the broker, with backoff, if it is still
//! away). Exiting rather than idling without serving is the simpler and safer choice:
//! nothing keeps keys the broker no longer vouches for, and the coordinator already
//! replaces a replica that answers UNAVAILABLE, so an idle one would be replaced anyway.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shardseal_proto::tls::{Pki, Role};

use crate::Error;
use crate::cold_start::{
    AttestedStage, ColdStartConfig, Released, attest_retrying, open_release, unix_millis_now,
};

/// Keeps the lease on `stage`'s keys renewed; returns only why it could not (the
/// function must then stop serving).
pub(crate) async fn keep_renewed(config: ColdStartConfig, stage: Arc<AttestedStage>) -> Error {
    let tls = match Pki::open(&config.pki_dir).and_then(|pki| pki.client_config(Role::Broker, None))
    {
        Ok(tls) => tls,
        Err(e) => return Error::Config(e.to_string()),
    };
    loop {
        let expires_at_ms = stage.lease_expires_at_ms.load(Ordering::Acquire);
        let remaining = Duration::from_millis(expires_at_ms.saturating_sub(unix_millis_now()));
        // Halfway: the other half is left for retries while the broker is away.
        tokio::time::sleep(remaining / 2).await;
        let expires_at = Instant::now() + remaining / 2;
        let renewed = match attest_retrying(&config, &tls, expires_at).await {
            Ok(attested) => open_release(&config, attested),
            Err(e) => Err(e),
        };
        let released = match renewed {
            Ok(released) => released,
            Err(e) if stage.lease_expired() || Instant::now() >= expires_at => {
                tracing::error!(error = %e, "key lease expired before the broker renewed it");
                return Error::LeaseExpired;
            }
            Err(e) => {
                tracing::error!(error = %e, "key lease renewal refused");
                return e;
            }
        };
        if let Err(e) = same_keys(&stage, &released) {
            tracing::error!(error = %e, "key lease renewal released other keys");
            return e;
        }
        let Released {
            token,
            lease_expires_at_ms,
            ..
        } = released;
        *stage
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = token;
        stage
            .lease_expires_at_ms
            .store(lease_expires_at_ms, Ordering::Release);
        tracing::info!(
            expires_in_ms = lease_expires_at_ms.saturating_sub(unix_millis_now()),
            "key lease renewed"
        );
    }
}

/// A renewal keeps serving the loaded shard only if the broker released the keys this
/// process already holds: the same version and stage key.
fn same_keys(stage: &AttestedStage, released: &Released) -> Result<(), Error> {
    if released.release.version != stage.version.0
        || released.stage_key.public_key().as_bytes() != stage.stage_key.public_key().as_bytes()
    {
        return Err(Error::Broker(
            "the broker released other keys (a new version or rotated keys)".into(),
        ));
    }
    Ok(())
}
