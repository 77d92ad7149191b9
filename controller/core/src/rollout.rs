//! How a deploy rolls over its hosts: in batches (`--serial N|N%`), each
//! healthy before the next starts, stopping once more hosts failed than
//! `--max-fail N|N%` allows. The health gate itself is the agent's: a
//! converge ends when every service's health check passes and every
//! changed service without one has kept running its minimum healthy time,
//! and a host whose converge fails returns to its last revision on its
//! own (unless `--no-rollback`); see the agent's `engine::revisions`.

use std::str::FromStr;

/// A number of hosts, absolute or a share of the deploy's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Hosts(usize),
    Percent(u8),
}

impl Count {
    /// How many hosts of `total` this is: a share is rounded up, so `25%`
    /// of 3 hosts is 1.
    pub fn of(self, total: usize) -> usize {
        match self {
            Count::Hosts(n) => n,
            Count::Percent(p) => (total * usize::from(p)).div_ceil(100),
        }
    }
}

impl FromStr for Count {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is neither a number of hosts (`2`) nor a share of them (`25%`)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Count::Percent(p)),
                _ => Err(bad()),
            },
            None => s.parse::<usize>().map(Count::Hosts).map_err(|_| bad()),
        }
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Count::Hosts(n) => write!(f, "{n}"),
            Count::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The rollout flags of `deploy`.
#[derive(Debug, Clone, Default)]
pub struct RolloutOptions {
    /// Hosts per batch; `None`: every host in one batch.
    pub serial: Option<Count>,
    /// Failed hosts the rollout tolerates before it stops (default 0).
    pub max_fail: Option<Count>,
    /// Keep a failed revision on its host instead of returning to the last one.
    pub no_rollback: bool,
    /// Seconds a changed service without a health check must keep running;
    /// `None`: 10 with `--serial` (Nomad's `min_healthy_time`), else 0.
    pub min_healthy_seconds: Option<u32>,
}

impl RolloutOptions {
    pub fn min_healthy_seconds(&self) -> u32 {
        self.min_healthy_seconds.unwrap_or(if self.serial.is_some() { 10 } else { 0 })
    }

    /// Failed hosts allowed among `total`: a share is rounded down, so
    /// `10%` of 3 hosts allows none (never more than the share says).
    pub fn max_fail(&self, total: usize) -> usize {
        match self.max_fail.unwrap_or(Count::Hosts(0)) {
            Count::Hosts(n) => n,
            Count::Percent(p) => total * usize::from(p) / 100,
        }
    }
}

/// `hosts` (in deploy order) cut into batches of `serial` hosts (at least
/// one each); one batch without `serial`.
pub fn batches(hosts: &[String], serial: Option<Count>) -> Vec<Vec<String>> {
    if hosts.is_empty() {
        return Vec::new();
    }
    let size = serial.map_or(hosts.len(), |c| c.of(hosts.len()).max(1));
    hosts.chunks(size).map(<[String]>::to_vec).collect()
}

/// Four hex digits that tell apart two runs started in the same second.
pub fn salt() -> String {
    use sha2::Digest;
    let now = time::OffsetDateTime::now_utc();
    let digest = sha2::Sha256::digest(format!("{} {}", now.unix_timestamp_nanos(), std::process::id()));
    hex::encode(&digest[..2])
}

/// An id for one deploy over many hosts, kept with each host's revision
/// (`mlopsctl rollback --to-deploy ID`): the UTC time and a random suffix.
pub fn deploy_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        salt()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("h{i}")).collect()
    }

    #[test]
    fn counts_parse_and_shares_round_up() {
        assert_eq!("2".parse::<Count>(), Ok(Count::Hosts(2)));
        assert_eq!("25%".parse::<Count>(), Ok(Count::Percent(25)));
        for bad in ["", "x", "-1", "101%", "%", "1.5"] {
            let e = bad.parse::<Count>().unwrap_err();
            assert!(e.contains("share of them"), "{bad}: {e}");
        }
        assert_eq!(Count::Percent(25).of(3), 1);
        assert_eq!(Count::Percent(50).of(5), 3);
        assert_eq!(Count::Percent(0).of(5), 0);
        assert_eq!(Count::Hosts(2).of(100), 2);
    }

    #[test]
    fn hosts_are_cut_in_order_and_a_batch_is_never_empty() {
        assert_eq!(
            batches(&names(5), Some(Count::Hosts(2))),
            vec![names(2), vec!["h3".into(), "h4".into()], vec!["h5".to_string()]]
        );
        assert_eq!(batches(&names(3), None), vec![names(3)]);
        assert_eq!(batches(&names(3), Some(Count::Percent(0))).len(), 3, "0% is one host per batch");
        assert_eq!(batches(&names(3), Some(Count::Hosts(0))).len(), 3);
        assert!(batches(&[], Some(Count::Hosts(1))).is_empty());
    }

    #[test]
    fn defaults_follow_serial() {
        let mut o = RolloutOptions::default();
        assert_eq!((o.min_healthy_seconds(), o.max_fail(10)), (0, 0));
        o.serial = Some(Count::Hosts(1));
        assert_eq!(o.min_healthy_seconds(), 10);
        o.max_fail = Some(Count::Percent(30));
        assert_eq!(o.max_fail(10), 3);
        o.max_fail = Some(Count::Percent(10));
        assert_eq!(o.max_fail(3), 0, "a share of failures rounds down");
        let id = deploy_id();
        assert!(id.len() == 21 && id.as_bytes()[8] == b'T' && id.contains("Z-"), "{id}");
    }
}
