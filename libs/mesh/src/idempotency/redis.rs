//! Idempotency records in Redis, shared by every replica.
//!
//! One hash per key: `state` (`running` or `done`), `token` (the owner's), `fp` (the request's
//! fingerprint), `answer`. Every change is a Lua script, so claiming is atomic across replicas and
//! only the owner can complete or release a record.

use std::time::Duration;

use redis::Script;

use super::{Record, StoreError};
use crate::store::{ConnectOptions, RedisConnection, connect_lazy};

/// Claims the key, or returns the record that holds it.
/// KEYS[1] = key; ARGV = token, fingerprint, lease (ms). Returns {} when claimed, else
/// {state, fp, answer}.
const CLAIM: &str = r"
local found = redis.call('HMGET', KEYS[1], 'state', 'fp', 'answer')
if found[1] then
  return {found[1], found[2] or '', found[3] or ''}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'token', ARGV[1], 'fp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {}
";

/// Records the answer if the token still owns a running record.
/// KEYS[1] = key; ARGV = token, answer, retention (ms). Returns 1 when recorded.
const COMPLETE: &str = r"
local found = redis.call('HMGET', KEYS[1], 'state', 'token')
if found[1] ~= 'running' or found[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'done', 'answer', ARGV[2])
redis.call('HDEL', KEYS[1], 'token')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Deletes a running record if the token owns it. KEYS[1] = key; ARGV = token.
const RELEASE: &str = r"
local found = redis.call('HMGET', KEYS[1], 'state', 'token')
if found[1] == 'running' and found[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
";

pub(super) struct RedisStore {
    connection: RedisConnection,
    claim: Script,
    complete: Script,
    release: Script,
}

impl RedisStore {
    /// A store over a connection made on first use, so Redis may start after the service.
    pub(super) fn lazy(url: &str) -> Result<Self, String> {
        // The store defaults' timeouts, and one reconnection attempt per command.
        let options = ConnectOptions {
            retries: Some(1),
            ..ConnectOptions::default()
        };
        Ok(Self {
            connection: connect_lazy(url, &options).map_err(|error| error.to_string())?,
            claim: Script::new(CLAIM),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        })
    }

    pub(super) async fn try_claim(
        &self,
        key: &str,
        token: &str,
        fingerprint: &str,
        lease: Duration,
    ) -> Result<Option<Record>, StoreError> {
        let mut connection = self.connection.clone();
        let found: Vec<Vec<u8>> = self
            .claim
            .key(key)
            .arg(token)
            .arg(fingerprint)
            .arg(millis(lease))
            .invoke_async(&mut connection)
            .await
            .map_err(error)?;
        let mut found = found.into_iter();
        let (Some(state), Some(fingerprint), Some(answer)) =
            (found.next(), found.next(), found.next())
        else {
            return Ok(None);
        };
        Ok(Some(Record {
            done: state == b"done",
            fingerprint: String::from_utf8_lossy(&fingerprint).into_owned(),
            answer,
        }))
    }

    pub(super) async fn complete(
        &self,
        key: &str,
        token: &str,
        answer: &[u8],
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let recorded: i64 = self
            .complete
            .key(key)
            .arg(token)
            .arg(answer)
            .arg(millis(retention))
            .invoke_async(&mut connection)
            .await
            .map_err(error)?;
        Ok(recorded == 1)
    }

    pub(super) async fn release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .release
            .key(key)
            .arg(token)
            .invoke_async(&mut connection)
            .await
            .map_err(error)?;
        Ok(())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn error(error: redis::RedisError) -> StoreError {
    StoreError(format!("redis: {error}"))
}
