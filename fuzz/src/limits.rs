//! `limits`: `PendingSlots`, `TokenBucket`, `InstanceCounters` and `LogGate` driven by
//! operation sequences, each checked against a simple model.
//!
//! Checks: pending slots never exceed their capacity, evict exactly the oldest entry and only
//! when full, hand out increasing keys and expire the oldest first; a token bucket never grants
//! more than its burst plus what its rate refilled; instance counters accept a counter exactly
//! when it is above the last accepted one of a remembered instance (or the instance is not
//! remembered) and remember at most their capacity; a log gate passes at most `per_second`
//! lines per reason and window and reports exactly the lines it suppressed.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::limits::{InstanceCounters, LogGate, LogVerdict, PendingSlots, TokenBucket};

use super::Reader;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let base = Instant::now();
    match r.u8() % 4 {
        0 => pending(&mut r, base),
        1 => bucket(&mut r, base),
        2 => instances(&mut r),
        _ => gate(&mut r, base),
    }
}

fn pending(r: &mut Reader<'_>, base: Instant) {
    let cap = r.below(6);
    let mut slots: PendingSlots<u32> = PendingSlots::new(cap);
    assert_eq!(slots.capacity(), cap.max(1));
    let mut model: BTreeMap<u64, (u32, Duration)> = BTreeMap::new();
    let mut now = Duration::ZERO;
    let mut last_key = None;
    let timeout = Duration::from_millis(u64::from(r.u8()) * 10);
    let mut n = 0u32;
    while !r.is_empty() {
        match r.u8() % 5 {
            0 | 1 => {
                n += 1;
                let (key, evicted) = slots.insert(n, base + now);
                assert!(last_key.is_none_or(|k| key > k), "keys must increase");
                last_key = Some(key);
                let want = if model.len() >= cap.max(1) {
                    model.pop_first().map(|(_, (v, _))| v)
                } else {
                    None
                };
                assert_eq!(evicted, want, "evicts the oldest, only when full");
                model.insert(key, (n, now));
            }
            2 => {
                let back = u64::from(r.u8() % 8);
                let key = last_key.map_or(0, |k: u64| k.saturating_sub(back));
                assert_eq!(slots.contains(key), model.contains_key(&key));
                assert_eq!(slots.remove(key), model.remove(&key).map(|(v, _)| v));
            }
            3 => now += Duration::from_millis(u64::from(r.u8()) * 10),
            _ => {
                let gone = slots.expire(base + now, timeout);
                let mut want = Vec::new();
                while let Some((_, (v, t))) = model.first_key_value() {
                    if now.saturating_sub(*t) < timeout {
                        break;
                    }
                    want.push(*v);
                    model.pop_first();
                }
                assert_eq!(gone, want);
            }
        }
        assert_eq!(slots.len(), model.len());
        assert!(slots.len() <= slots.capacity());
        assert_eq!(slots.is_empty(), model.is_empty());
        let deadline = slots.next_deadline(timeout);
        let want = model
            .first_key_value()
            .map(|(_, (_, t))| base + *t + timeout);
        assert_eq!(deadline, want);
    }
}

fn bucket(r: &mut Reader<'_>, base: Instant) {
    let rate = u32::from(r.u16() % 1000);
    let burst = u32::from(r.u16() % 1000);
    let (mut b, size) = if r.bool() {
        (TokenBucket::per_second(rate), rate.max(1))
    } else {
        (TokenBucket::new(rate, burst), burst.max(1))
    };
    let mut now = Duration::ZERO;
    let mut taken = 0u64;
    while !r.is_empty() {
        match r.u8() % 3 {
            0 => now += Duration::from_micros(u64::from(r.u16()) * 100),
            1 => {
                let next = b.next_token(base + now);
                assert!(next >= base + now);
                if rate == 0 {
                    assert_eq!(next, base + now);
                }
            }
            _ => {
                if b.try_take(base + now) {
                    taken += 1;
                }
            }
        }
        // Granted: at most the full bucket plus the refill (slack for float rounding).
        let limit = f64::from(size) + now.as_secs_f64() * f64::from(rate) + 1e-6;
        assert!((taken as f64) <= limit, "{taken} tokens > {limit}");
    }
}

fn instances(r: &mut Reader<'_>) {
    let cap = r.below(5);
    let mut c = InstanceCounters::new(cap);
    let mut model: HashMap<u64, u64> = HashMap::new();
    while !r.is_empty() {
        let instance = u64::from(r.u8() % 8);
        let counter = u64::from(r.u8());
        let ok = c.check(instance, counter);
        match model.get(&instance) {
            // A remembered instance: only a higher counter passes.
            Some(last) => assert_eq!(ok, counter > *last, "instance {instance} counter {counter}"),
            None => assert!(ok, "a new instance is accepted"),
        }
        if ok {
            if model.len() >= cap.max(1) && !model.contains_key(&instance) {
                // The instance with the lowest counter is forgotten.
                if let Some(low) = model.values().min().copied() {
                    let gone: Vec<u64> = model
                        .iter()
                        .filter(|(_, v)| **v == low)
                        .map(|(k, _)| *k)
                        .collect();
                    if gone.len() == 1 {
                        model.remove(&gone[0]);
                    } else {
                        // Ties: which one goes is unspecified; stop modelling exactly.
                        return;
                    }
                }
            }
            model.insert(instance, counter);
        }
        assert!(c.len() <= cap.max(1));
        assert_eq!(c.len(), model.len());
        assert_eq!(c.is_empty(), model.is_empty());
    }
}

fn gate(r: &mut Reader<'_>, base: Instant) {
    const REASONS: [&str; 4] = ["a", "b", "c", "d"];
    let per_second = u32::from(r.u8() % 5);
    let mut g = LogGate::new(per_second);
    let limit = per_second.max(1);
    // Per reason: window start, lines logged in it, lines suppressed since the last logged.
    let mut model: HashMap<&str, (Duration, u32, u64)> = HashMap::new();
    let mut now = Duration::ZERO;
    while !r.is_empty() {
        let b = r.u8();
        if b & 0x80 != 0 {
            now += Duration::from_millis(u64::from(b & 0x7f) * 20);
            continue;
        }
        let reason = REASONS[usize::from(b) % REASONS.len()];
        let v = g.allow(reason, base + now);
        let w = model.entry(reason).or_insert((now, 0, 0));
        if now.saturating_sub(w.0) >= Duration::from_secs(1) {
            *w = (now, 0, w.2);
        }
        let want = if w.1 < limit {
            w.1 += 1;
            LogVerdict::Log {
                suppressed: std::mem::take(&mut w.2),
            }
        } else {
            w.2 += 1;
            LogVerdict::Suppress
        };
        assert_eq!(v, want, "reason {reason} at {now:?}");
    }
}
