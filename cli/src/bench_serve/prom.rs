//! Latency quantiles from a node's Prometheus text: summaries
//! (`name{quantile="0.99"} v`) and histograms (`name_bucket{le="…"} n`,
//! `_sum`, `_count`), whatever other labels the series carry. Histogram
//! series with different labels (one per worker, say) are added up, and
//! quantiles are interpolated linearly within a bucket, as Prometheus'
//! `histogram_quantile` does.

use std::collections::BTreeMap;

/// One metric as read from an exposition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Latency {
    /// Cumulative bucket counts by upper bound (`+Inf` as `f64::INFINITY`).
    pub buckets: Vec<(f64, f64)>,
    /// Summary quantiles as exposed (`quantile` → value).
    pub quantiles: Vec<(f64, f64)>,
    pub count: f64,
    pub sum: f64,
}

/// The value of label `name` in a `{…}` label set, if there.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = labels;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim();
        let after = &rest[eq + 1..];
        let after = after.strip_prefix('"')?;
        // Values may hold escaped quotes.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end?;
        if key == name {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    None
}

/// Splits `name{labels} value [timestamp]` into its parts.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (head, value) = if let Some(open) = line.find('{') {
        let close = line.rfind('}')?;
        (
            (&line[..open], &line[open + 1..close]),
            line[close + 1..].split_whitespace().next()?,
        )
    } else {
        let mut it = line.split_whitespace();
        ((it.next()?, ""), it.next()?)
    };
    let v = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((head.0, head.1, v))
}

fn parse_bound(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        s => s.parse().ok(),
    }
}

/// Reads metric `name` (a summary or a histogram) from `text`; `None` when absent.
pub fn read(text: &str, name: &str) -> Option<Latency> {
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    let mut out = Latency::default();
    let mut seen = false;
    let bucket = format!("{name}_bucket");
    let count = format!("{name}_count");
    let sum = format!("{name}_sum");
    for line in text.lines() {
        let Some((metric, labels, v)) = sample(line) else {
            continue;
        };
        if metric == bucket {
            let Some(le) = label(labels, "le").and_then(parse_bound) else {
                continue;
            };
            // Order bounds by their bit pattern (all non-negative here).
            let key = if le.is_infinite() {
                u64::MAX
            } else {
                le.max(0.0).to_bits()
            };
            buckets.entry(key).or_insert((le, 0.0)).1 += v;
            seen = true;
        } else if metric == count {
            out.count += v;
            seen = true;
        } else if metric == sum {
            out.sum += v;
            seen = true;
        } else if metric == name {
            if let Some(q) = label(labels, "quantile").and_then(|q| q.parse().ok()) {
                if v.is_finite() {
                    out.quantiles.push((q, v));
                }
                seen = true;
            }
        }
    }
    out.buckets = buckets.into_values().collect();
    seen.then_some(out)
}

impl Latency {
    /// What happened between `before` and `self` (histograms only; a
    /// summary's quantiles cannot be subtracted and are kept as they are).
    pub fn since(&self, before: Option<&Latency>) -> Latency {
        let Some(b) = before else {
            return self.clone();
        };
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, n)| {
                let prev = b
                    .buckets
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map_or(0.0, |x| x.1);
                (le, (n - prev).max(0.0))
            })
            .collect();
        Latency {
            buckets,
            quantiles: self.quantiles.clone(),
            count: (self.count - b.count).max(0.0),
            sum: self.sum - b.sum,
        }
    }

    /// Quantile `q` (0..=1): from the buckets when there are any, else the
    /// summary's exposed quantile closest to `q`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if !self.buckets.is_empty() {
            return histogram_quantile(q, &self.buckets);
        }
        self.quantiles
            .iter()
            .min_by(|a, b| (a.0 - q).abs().total_cmp(&(b.0 - q).abs()))
            .filter(|(qq, _)| (qq - q).abs() < 1e-9)
            .map(|x| x.1)
    }
}

pub use tandem_cluster::metrics::histogram_quantile;

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = "\
# TYPE tandem_router_dispatch_seconds summary
tandem_router_dispatch_seconds{quantile=\"0.5\"} 0.00004
tandem_router_dispatch_seconds{quantile=\"0.99\"} 0.00007
tandem_router_dispatch_seconds_sum 0.01
tandem_router_dispatch_seconds_count 109
";

    const HISTOGRAM: &str = "\
# TYPE tandem_router_dispatch_seconds histogram
tandem_router_dispatch_seconds_bucket{model=\"m\",role=\"router\",worker_id=\"a\",le=\"0.001\"} 40
tandem_router_dispatch_seconds_bucket{model=\"m\",role=\"router\",worker_id=\"a\",le=\"0.01\"} 90
tandem_router_dispatch_seconds_bucket{model=\"m\",role=\"router\",worker_id=\"a\",le=\"+Inf\"} 100
tandem_router_dispatch_seconds_sum{model=\"m\",role=\"router\",worker_id=\"a\"} 0.5
tandem_router_dispatch_seconds_count{model=\"m\",role=\"router\",worker_id=\"a\"} 100
tandem_router_dispatch_seconds_bucket{le=\"0.001\",model=\"m\",role=\"router\",worker_id=\"b\"} 60
tandem_router_dispatch_seconds_bucket{le=\"0.01\",model=\"m\",role=\"router\",worker_id=\"b\"} 100
tandem_router_dispatch_seconds_bucket{le=\"+Inf\",model=\"m\",role=\"router\",worker_id=\"b\"} 100
tandem_router_dispatch_seconds_count{model=\"m\",role=\"router\",worker_id=\"b\"} 100
tandem_router_relay_seconds_bucket{le=\"1\"} 3
";

    #[test]
    fn reads_the_old_summary_form() {
        let l = read(SUMMARY, "tandem_router_dispatch_seconds").unwrap();
        assert_eq!(l.count, 109.0);
        assert_eq!(l.quantile(0.5), Some(0.00004));
        assert_eq!(l.quantile(0.99), Some(0.00007));
        assert_eq!(l.quantile(0.9), None);
        assert!(read(SUMMARY, "tandem_router_relay_seconds").is_none());
    }

    #[test]
    fn reads_histograms_summed_over_labels() {
        let l = read(HISTOGRAM, "tandem_router_dispatch_seconds").unwrap();
        assert_eq!(l.count, 200.0);
        assert_eq!(
            l.buckets,
            vec![(0.001, 100.0), (0.01, 190.0), (f64::INFINITY, 200.0)]
        );
        // Rank 100 of 200 is the top of the first bucket.
        assert!((l.quantile(0.5).unwrap() - 0.001).abs() < 1e-12);
        // Rank 150: 50 of the 90 in (0.001, 0.01].
        let p75 = l.quantile(0.75).unwrap();
        assert!((p75 - (0.001 + 0.009 * 50.0 / 90.0)).abs() < 1e-12, "{p75}");
        // Rank 198 lies in +Inf: the largest finite bound.
        assert_eq!(l.quantile(0.99), Some(0.01));
        // The first bucket interpolates from zero.
        assert!((l.quantile(0.25).unwrap() - 0.0005).abs() < 1e-12);
    }

    #[test]
    fn differences_between_two_scrapes() {
        let before = read(HISTOGRAM, "tandem_router_dispatch_seconds").unwrap();
        let mut after = before.clone();
        after.buckets = vec![(0.001, 100.0), (0.01, 200.0), (f64::INFINITY, 210.0)];
        after.count = 210.0;
        let d = after.since(Some(&before));
        assert_eq!(d.count, 10.0);
        assert_eq!(
            d.buckets,
            vec![(0.001, 0.0), (0.01, 10.0), (f64::INFINITY, 10.0)]
        );
        assert!((d.quantile(0.5).unwrap() - 0.0055).abs() < 1e-12);
    }

    #[test]
    fn garbage_is_ignored_not_fatal() {
        let text = "tandem_router_dispatch_seconds_bucket{le=\"x\"} 1\nnonsense {{{\n\
                    tandem_router_dispatch_seconds_bucket{le=\"0.1\"} nope\n";
        let l = read(text, "tandem_router_dispatch_seconds");
        assert!(l.is_none_or(|l| l.quantile(0.5).is_none()));
        assert_eq!(histogram_quantile(0.5, &[]), None);
        assert_eq!(histogram_quantile(0.5, &[(1.0, 0.0)]), None);
    }
}
