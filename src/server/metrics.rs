//! Counters and gauges for `GET /metrics`, in Prometheus' text format.
//! Written here rather than with the `prometheus` crate: a dozen atomics and
//! one histogram render in a few lines, and no registry is needed.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds) of the time-to-first-token histogram's buckets.
const TTFT_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    /// Answered 429: the queue was full.
    pub rejected: AtomicU64,
    /// Answered 400 or 401.
    pub bad_requests: AtomicU64,
    /// Ended because the client went away or the server stopped.
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub prefix_misses: AtomicU64,
    /// Prompt tokens not read thanks to a cached prefix.
    pub prefix_tokens_reused: AtomicU64,
    pub prefix_cache_bytes: AtomicU64,
    pub prefix_cache_entries: AtomicU64,
    pub queued: AtomicU64,
    pub active: AtomicU64,
    /// f64 bits: generated tokens per second over the last few seconds.
    pub tokens_per_second: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len()],
    ttft_count: AtomicU64,
    /// Microseconds.
    ttft_sum_us: AtomicU64,
}

impl Metrics {
    pub fn observe_ttft(&self, seconds: f64) {
        for (b, &le) in self.ttft_buckets.iter().zip(&TTFT_BUCKETS) {
            if seconds <= le {
                b.fetch_add(1, Relaxed);
            }
        }
        self.ttft_count.fetch_add(1, Relaxed);
        self.ttft_sum_us.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    pub fn set_tokens_per_second(&self, v: f64) {
        self.tokens_per_second.store(v.to_bits(), Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP rwkv_{name} {help}\n# TYPE rwkv_{name} {kind}\nrwkv_{name} {value}");
        };
        let get = |a: &AtomicU64| a.load(Relaxed).to_string();
        one("requests_total", "counter", "Completion requests received.", get(&self.requests));
        one("rejected_total", "counter", "Requests answered 429 (queue full).", get(&self.rejected));
        one("bad_requests_total", "counter", "Requests answered 400 or 401.", get(&self.bad_requests));
        one("cancelled_total", "counter", "Requests ended by a client leaving or shutdown.", get(&self.cancelled));
        one("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", get(&self.prompt_tokens));
        one("generated_tokens_total", "counter", "Tokens generated.", get(&self.generated_tokens));
        one("steps_total", "counter", "Batched GPU steps run.", get(&self.steps));
        one(
            "prefix_cache_hits_total",
            "counter",
            "Requests started from a cached prefix state.",
            get(&self.prefix_hits),
        );
        one("prefix_cache_misses_total", "counter", "Requests started cold.", get(&self.prefix_misses));
        one(
            "prefix_cache_reused_tokens_total",
            "counter",
            "Prompt tokens not read thanks to the prefix cache.",
            get(&self.prefix_tokens_reused),
        );
        one("prefix_cache_bytes", "gauge", "Bytes of states in the prefix cache.", get(&self.prefix_cache_bytes));
        one("prefix_cache_entries", "gauge", "States in the prefix cache.", get(&self.prefix_cache_entries));
        one("queue_length", "gauge", "Requests waiting for a session.", get(&self.queued));
        one("active_sessions", "gauge", "Requests being read or generated.", get(&self.active));
        let tps = f64::from_bits(self.tokens_per_second.load(Relaxed));
        one("tokens_per_second", "gauge", "Tokens generated per second, recent.", format!("{tps:.3}"));
        let _ = writeln!(
            out,
            "# HELP rwkv_time_to_first_token_seconds From request to the first generated token.\n\
             # TYPE rwkv_time_to_first_token_seconds histogram"
        );
        for (b, le) in self.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            let _ = writeln!(out, "rwkv_time_to_first_token_seconds_bucket{{le=\"{le}\"}} {}", b.load(Relaxed));
        }
        let count = self.ttft_count.load(Relaxed);
        let _ = writeln!(out, "rwkv_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.ttft_sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "rwkv_time_to_first_token_seconds_sum {sum:.6}");
        let _ = writeln!(out, "rwkv_time_to_first_token_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.prefix_hits.fetch_add(2, Relaxed);
        m.observe_ttft(0.02);
        m.observe_ttft(3.0);
        let text = m.render();
        assert!(text.contains("# TYPE rwkv_prefix_cache_hits_total counter\nrwkv_prefix_cache_hits_total 2\n"));
        assert!(text.contains("rwkv_time_to_first_token_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(text.contains("rwkv_time_to_first_token_seconds_bucket{le=\"5\"} 2\n"));
        assert!(text.contains("rwkv_time_to_first_token_seconds_count 2\n"));
        // Every sample line is `name[{labels}] value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("rwkv_") && value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
