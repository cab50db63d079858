//! Figures of one run: latency distributions, throughput and goodput.

use serde::Serialize;

use super::client::Record;

/// mean, p50, p90, p99 (milliseconds); percentiles interpolate linearly
/// between order statistics, as numpy's default does.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Dist {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

pub fn percentile_sorted(s: &[f64], p: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    let x = (s.len() - 1) as f64 * p.clamp(0.0, 1.0);
    let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (x - lo as f64)
}

impl Dist {
    /// From values in seconds.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Dist {
        let mut v: Vec<f64> = values
            .into_iter()
            .filter(|x| x.is_finite())
            .map(|x| x * 1e3)
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return Dist::default();
        }
        Dist {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile_sorted(&v, 0.5),
            p90: percentile_sorted(&v, 0.9),
            p99: percentile_sorted(&v, 0.99),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Slo {
    pub ttft_s: f64,
    pub tpot_s: f64,
}

impl Slo {
    pub fn met_by(&self, r: &Record) -> bool {
        r.ok && r.ttft_s <= self.ttft_s && r.tpot().is_none_or(|t| t <= self.tpot_s)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub completed: usize,
    pub errors: usize,
    /// Completed requests within both SLOs.
    pub met_slo: usize,
    /// First send to last completion.
    pub duration_s: f64,
    pub request_throughput: f64,
    /// Requests per second that met the SLO.
    pub goodput: f64,
    pub input_token_throughput: f64,
    pub output_token_throughput: f64,
    pub total_token_throughput: f64,
    pub mean_input_tokens: f64,
    pub mean_output_tokens: f64,
    pub ttft_ms: Dist,
    pub tpot_ms: Dist,
    pub itl_ms: Dist,
    pub e2e_ms: Dist,
}

/// Summarises `records` (completed or not) over `duration_s`.
pub fn summarise(records: &[&Record], duration_s: f64, slo: Slo) -> Summary {
    let ok: Vec<&&Record> = records.iter().filter(|r| r.ok).collect();
    let input: usize = ok.iter().map(|r| r.prompt_tokens).sum();
    let output: usize = ok.iter().map(|r| r.output_tokens).sum();
    let met = ok.iter().filter(|r| slo.met_by(r)).count();
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };
    let mean = |x: usize| {
        if ok.is_empty() {
            0.0
        } else {
            x as f64 / ok.len() as f64
        }
    };
    Summary {
        requests: records.len(),
        completed: ok.len(),
        errors: records.len() - ok.len(),
        met_slo: met,
        duration_s,
        request_throughput: per_s(ok.len() as f64),
        goodput: per_s(met as f64),
        input_token_throughput: per_s(input as f64),
        output_token_throughput: per_s(output as f64),
        total_token_throughput: per_s((input + output) as f64),
        mean_input_tokens: mean(input),
        mean_output_tokens: mean(output),
        ttft_ms: Dist::of(ok.iter().map(|r| r.ttft_s)),
        tpot_ms: Dist::of(ok.iter().filter_map(|r| r.tpot())),
        itl_ms: Dist::of(ok.iter().flat_map(|r| r.itl_s.iter().copied())),
        e2e_ms: Dist::of(ok.iter().map(|r| r.e2e_s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ok: bool, ttft: f64, e2e: f64, out: usize) -> Record {
        Record {
            ok,
            ttft_s: ttft,
            e2e_s: e2e,
            output_tokens: out,
            prompt_tokens: 10,
            itl_s: vec![(e2e - ttft) / (out.max(2) - 1) as f64; out.saturating_sub(1)],
            ..Default::default()
        }
    }

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile_sorted(&v, 0.5), 2.5);
        assert_eq!(percentile_sorted(&v, 1.0), 4.0);
        assert_eq!(percentile_sorted(&v, 0.0), 1.0);
        assert!(percentile_sorted(&[], 0.5).is_nan());
    }

    #[test]
    fn goodput_counts_only_requests_within_both_slos() {
        let rs = [
            rec(true, 0.1, 1.1, 11),  // tpot 0.1: fine
            rec(true, 0.5, 1.5, 11),  // ttft too long
            rec(true, 0.1, 3.1, 11),  // tpot 0.3: too slow
            rec(false, 0.0, 0.2, 0),  // failed
            rec(true, 0.05, 0.05, 1), // one token: no tpot
        ];
        let refs: Vec<&Record> = rs.iter().collect();
        let s = summarise(
            &refs,
            2.0,
            Slo {
                ttft_s: 0.2,
                tpot_s: 0.15,
            },
        );
        assert_eq!((s.requests, s.completed, s.errors, s.met_slo), (5, 4, 1, 2));
        assert_eq!(s.goodput, 1.0);
        assert_eq!(s.request_throughput, 2.0);
        assert!(s.goodput <= s.request_throughput);
        assert_eq!(s.output_token_throughput, 34.0 / 2.0);
        assert_eq!(s.tpot_ms.n, 3);
        assert_eq!(s.itl_ms.n, 30);
    }
}
