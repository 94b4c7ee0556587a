//! `phbench report`: the markdown table (medians over repetitions) and the
//! SVG plots of `scripts/bench-compare`: throughput against p99 per system,
//! and (for steady-state runs) p99 per second of the measured window, where
//! compaction stalls show. Plain SVG text: no fonts or plotting crates.

use std::collections::BTreeMap;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Medians over repetitions, per (label, in-flight).
pub fn report(
    input: &std::path::Path,
    svg: Option<&std::path::Path>,
    timeline_svg: Option<&std::path::Path>,
) -> Result<(), String> {
    let text = std::fs::read_to_string(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut groups: BTreeMap<(String, u64), Vec<&serde_json::Value>> = Default::default();
    for r in &rows {
        let label = r["label"].as_str().unwrap_or("?").to_string();
        let k = r["in_flight"].as_u64().unwrap_or(0);
        groups.entry((label, k)).or_default().push(r);
    }
    println!("| system | in flight | appends/s | p50 ms | p99 ms | p99.9 ms | server CPU-s / 1k | client CPU-s / 1k | machine idle % | bytes written / append | reps | errors |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for ((label, k), rs) in &groups {
        let m = |f: &str| median(rs.iter().filter_map(|r| r[f].as_f64()).collect());
        let tput = m("appends_per_s");
        let p99 = m("p99_us") / 1000.0;
        println!(
            "| {label} | {k} | {tput:.0} | {:.2} | {p99:.2} | {:.2} | {:.3} | {:.3} | {:.1} | {:.0} | {} | {} |",
            m("p50_us") / 1000.0,
            m("p999_us") / 1000.0,
            m("server_cpu_s_per_1k"),
            m("client_cpu_s_per_1k"),
            m("machine_idle_pct"),
            m("server_write_bytes_per_append"),
            rs.len(),
            rs.iter().filter_map(|r| r["errors"].as_u64()).sum::<u64>()
        );
        series.entry(label.clone()).or_default().push((tput, p99));
    }
    if let Some(path) = svg {
        std::fs::write(path, plot(&series)).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("phbench: wrote {}", path.display());
    }
    if let Some(path) = timeline_svg {
        // One line per (label, in flight, rep) that carries a timeline.
        let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for r in &rows {
            let Some(tl) = r["timeline"].as_array() else { continue };
            let name = format!(
                "{} {} r{}",
                r["label"].as_str().unwrap_or("?"),
                r["in_flight"].as_u64().unwrap_or(0),
                r["rep"].as_u64().unwrap_or(0)
            );
            let pts = tl
                .iter()
                .filter_map(|p| Some((p["s"].as_f64()?, p["p99_us"].as_f64()? / 1000.0)))
                .collect();
            lines.insert(name, pts);
        }
        if lines.is_empty() {
            // Only steady-state runs (`--timeline`) carry one.
            eprintln!(
                "phbench: no run in the input has a timeline; {} not written",
                path.display()
            );
        } else {
            let svg = plot_lines(&lines, "second of the measured window", false);
            std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))?;
            eprintln!("phbench: wrote {}", path.display());
        }
    }
    Ok(())
}

/// A throughput (x) against p99 latency (y, log scale) plot, one line per
/// system.
fn plot(series: &BTreeMap<String, Vec<(f64, f64)>>) -> String {
    plot_lines(series, "appends/s", true)
}

/// Lines of (x, p99 ms) points, y on a log scale; `dots` marks each point.
fn plot_lines(series: &BTreeMap<String, Vec<(f64, f64)>>, x_label: &str, dots: bool) -> String {
    const W: f64 = 760.0;
    const H: f64 = 460.0;
    const L: f64 = 70.0;
    const R: f64 = 190.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];
    let xmax = series
        .values()
        .flatten()
        .map(|p| p.0)
        .filter(|v| v.is_finite())
        .fold(1.0_f64, f64::max)
        * 1.05;
    // Only finite, positive latencies set the scale: with none (no points,
    // or all zero) the axis is 0.01..10 ms rather than an infinite range,
    // whose tick loop below would never end.
    let finite = || {
        series
            .values()
            .flatten()
            .map(|p| p.1)
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let lowest = finite().fold(f64::INFINITY, f64::min);
    let ymin = if lowest.is_finite() {
        lowest.clamp(0.01, 1e9)
    } else {
        1.0
    };
    let ymax = finite().fold(0.0_f64, f64::max).clamp(ymin * 10.0, 1e10);
    let (ly0, ly1) = (ymin.log10().floor(), ymax.log10().ceil());
    let x = |v: f64| L + (W - L - R) * v / xmax;
    let y = |v: f64| H - B - (H - T - B) * (v.max(ymin).log10() - ly0) / (ly1 - ly0).max(1.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<line x1=\"{L}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/><line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{0}\" stroke=\"black\"/>\n",
        H - B,
        W - R
    );
    for i in 0..=5 {
        let v = xmax * f64::from(i) / 5.0;
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text>\n",
            x(v),
            H - B + 18.0,
            v
        );
    }
    let mut e = ly0;
    while e <= ly1 {
        let v = 10f64.powf(e);
        s += &format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text><line x1=\"{L}\" y1=\"{1:.1}\" x2=\"{2}\" y2=\"{1:.1}\" stroke=\"#ddd\"/>\n",
            L - 6.0,
            y(v),
            W - R
        );
        e += 1.0;
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"start\">p99 latency, ms (log scale)</text>\n",
        L + (W - L - R) / 2.0,
        H - 12.0,
        L - 40.0,
        T - 12.0
    );
    for (i, (label, pts)) in series.iter().enumerate() {
        let c = colors.get(i % colors.len()).copied().unwrap_or("black");
        let mut pts = pts.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = pts.iter().map(|(t, l)| format!("{:.1},{:.1}", x(*t), y(*l))).collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>\n",
            path.join(" ")
        );
        for (t, l) in pts.iter().filter(|_| dots) {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n",
                x(*t),
                y(*l)
            );
        }
        let ly = T + 10.0 + 20.0 * i as f64;
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\">{label}</text>\n",
            W - R + 15.0,
            ly - 4.0,
            W - R + 35.0,
            ly + 1.0
        );
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of unary runs once looped forever here (an infinite y range)
    /// and grew until the OOM killer stopped it, slowing every benchmark
    /// run next to it.
    #[test]
    fn a_plot_of_no_points_or_odd_points_is_small_and_finite() {
        let empty: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let mut odd = BTreeMap::new();
        odd.insert("a".to_string(), vec![(0.0, 0.0), (f64::INFINITY, f64::NAN), (1.0, 5.0)]);
        let mut no_line = BTreeMap::new();
        no_line.insert("a".to_string(), Vec::new());
        for series in [empty, odd, no_line] {
            let svg = plot_lines(&series, "x", true);
            assert!(svg.len() < 64 << 10, "{} bytes", svg.len());
            assert!(svg.ends_with("</svg>\n") || svg.ends_with("</svg>"), "{svg}");
        }
    }
}
