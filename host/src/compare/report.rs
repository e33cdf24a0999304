//! `report.json` and `report.html`: the same runs, for tools and for people.
//!
//! The HTML page is self-contained (inline SVG drawn with plotters, inline
//! CSS, no script, no fetches): it can be mailed, attached to a ticket or
//! opened from a CI artefact. It leads with the verdict, then the ranked
//! table, then three charts: load per segw over time for each policy,
//! disruption per event against the minimum, and the final spread against
//! each segw's fair share.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::{ranked, PolicyRun, Scenario};

/// Colours for segws and policies: Okabe–Ito, readable by the colour-blind.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One JSON array, one object per policy, in the order run. Deterministic
/// for a seed when timing is off (floats are rounded, maps are sorted).
pub fn json(runs: &[PolicyRun]) -> String {
    let mut s = serde_json::to_string_pretty(runs).expect("plain data serialises");
    s.push('\n');
    s
}

/// Write `report.json` and `report.html` into `dir` (created if missing).
pub fn write(
    dir: &Path,
    scenario: &Scenario,
    seed: u64,
    runs: &[PolicyRun],
) -> io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let json_path = dir.join("report.json");
    let html_path = dir.join("report.html");
    std::fs::write(&json_path, json(runs))?;
    std::fs::write(&html_path, html(scenario, seed, runs))?;
    Ok((json_path, html_path))
}

/// The whole page.
pub fn html(scenario: &Scenario, seed: u64, runs: &[PolicyRun]) -> String {
    page(
        scenario,
        &format!("segwlb compare: {}", scenario.name),
        &format!("{scenario}; seed {seed}"),
        runs,
        "",
    )
}

/// The page with its own title and subtitle, and `extra` (HTML) before the
/// list of events: `segwlb lab compare` adds the lab against the
/// simulation there.
pub fn page(
    scenario: &Scenario,
    title: &str,
    subtitle: &str,
    runs: &[PolicyRun],
    extra: &str,
) -> String {
    let mut page = String::new();
    let title = escape(title);
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title}</title><style>{CSS}</style></head><body>\n\
         <h1>{title}</h1>\n<p class=\"what\">{}</p>\n",
        escape(subtitle)
    );
    page.push_str(&verdict(runs));
    page.push_str(&table(runs));
    page.push_str("<h2>Tunnels per segw over time</h2>\n<p class=\"note\">Grey lines: events. A good policy keeps the lines together (by weight) and flat through events that need no moves.</p>\n");
    page.push_str(&segw_legend(runs));
    page.push_str("<div class=\"grid\">\n");
    for run in ranked(runs) {
        page.push_str(&figure(load_over_time(scenario, run)));
    }
    page.push_str("</div>\n");
    if scenario.traffic.is_some() {
        page.push_str("<h2>Traffic per segw over time</h2>\n<p class=\"note\">What each segw carried, both ways, as the balancer counted it; faint lines: each segw's throughput capacity. A good policy keeps every line well under its own faint line, through the busy hour and the events.</p>\n");
        page.push_str(&segw_legend(runs));
        page.push_str("<div class=\"grid\">\n");
        for run in ranked(runs) {
            page.push_str(&figure(throughput_over_time(scenario, run)));
        }
        page.push_str("</div>\n");
    }
    page.push_str("<h2>Disruption at each event</h2>\n<p class=\"note\">Bars: tunnels each policy moved; black marks: the fewest any policy could move.</p>\n");
    page.push_str(&figure(disruption(scenario, runs)));
    page.push_str(&darkness(scenario, runs));
    page.push_str(&failovers(scenario, runs));
    page.push_str("<h2>Final spread</h2>\n<p class=\"note\">Tunnels on each segw over its fair share by weight: 1.0 everywhere is perfect.</p>\n");
    page.push_str(&segw_legend(runs));
    page.push_str(&figure(final_spread(runs)));
    page.push_str(extra);
    page.push_str("<h2>Events</h2>\n<ol>\n");
    for e in &scenario.events {
        let _ = writeln!(
            page,
            "<li>step {} (t = {} s): {}</li>",
            e.step,
            u64::from(e.step) * scenario.step_secs,
            escape(&e.label())
        );
    }
    page.push_str("</ol>\n</body></html>\n");
    page
}

/// Per policy and event: tunnel-minutes in the dark and one tunnel's p95,
/// as the peers' timers predict them.
fn darkness(scenario: &Scenario, runs: &[PolicyRun]) -> String {
    if runs.iter().all(|r| r.outage_seconds_per_event.is_empty()) {
        return String::new();
    }
    let mut out = format!(
        "<h3>Time in the dark</h3>\n<p class=\"note\">Tunnel-minutes the moved tunnels spend down before their initiators set up again on their new segw, and one tunnel's 95th percentile: {}.</p>\n<table><tr><th></th><th>policy</th>",
        escape(&scenario.peers.describe())
    );
    for (e, ev) in scenario.events.iter().enumerate() {
        let _ = write!(out, "<th>[{}] {}</th>", e + 1, escape(&ev.label()));
    }
    out.push_str("</tr>\n");
    for (i, r) in ranked(runs).iter().enumerate() {
        let _ = write!(out, "<tr><td>{}</td><td>{}</td>", i + 1, escape(&r.policy));
        for e in 0..scenario.events.len() {
            let cell = match (
                r.outage_seconds_per_event.get(e),
                r.outage_p95_per_event.get(e),
            ) {
                (Some(&s), Some(&p))
                    if s > 0.0 || r.moved_per_event.get(e).is_some_and(|&m| m > 0) =>
                {
                    format!("{:.1} min (p95 {p:.1} s)", s / 60.0)
                }
                _ => "–".to_string(),
            };
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    out
}

/// Per policy and `balancer_fail`: the tunnels the pair's standby knew,
/// placed again and moved, and their time in the dark.
fn failovers(scenario: &Scenario, runs: &[PolicyRun]) -> String {
    if !scenario.has_failovers() {
        return String::new();
    }
    let mut out = format!(
        "<h3>Balancer failover</h3>\n<p class=\"note\">Tunnels the standby knew (kept where they were), placed again (unknown to it) and moved (placed on another segw than their SA's), and tunnel-minutes in the dark: {}.</p>\n<table><tr><th></th><th>policy</th>",
        escape(&scenario.pair.describe())
    );
    for f in runs.first().map_or(&[][..], |r| &r.failovers) {
        let label = scenario.events[f.event].label();
        let _ = write!(out, "<th>[{}] {}</th>", f.event + 1, escape(&label));
    }
    out.push_str("</tr>\n");
    for (i, r) in ranked(runs).iter().enumerate() {
        let _ = write!(out, "<tr><td>{}</td><td>{}</td>", i + 1, escape(&r.policy));
        for f in &r.failovers {
            let _ = write!(
                out,
                "<td>{} kept, {} re-placed, {} moved; {:.1} min dark (p95 {:.1} s)</td>",
                f.kept,
                f.replaced,
                f.moved,
                f.dark_seconds / 60.0,
                f.dark_p95
            );
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    out
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}\
h1{font-size:1.5em;margin-bottom:0}.what{color:#555;margin-top:.3em}\
.verdict{display:flex;gap:1em;flex-wrap:wrap;margin:1em 0}\
.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;min-width:12em}\
.card b{display:block;font-size:1.2em}.bad{border-color:#d55e00;background:#fff3ec}\
table{border-collapse:collapse;margin:1em 0}td,th{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:right}\
td:nth-child(2),th:nth-child(2){text-align:left}.note{color:#555;font-size:.9em}\
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:.5em}\
figure{margin:0}svg{max-width:100%;height:auto}td.cells{white-space:nowrap;text-align:left;font-size:.85em}\
.legend span{margin-right:1.2em}.legend i{display:inline-block;width:1.6em;height:.35em;margin-right:.4em;vertical-align:middle}";

fn verdict(runs: &[PolicyRun]) -> String {
    let best = |key: &dyn Fn(&PolicyRun) -> f64| {
        runs.iter()
            .min_by(|a, b| key(a).total_cmp(&key(b)).then(a.policy.cmp(&b.policy)))
    };
    let mut out = String::from("<div class=\"verdict\">\n");
    if let Some(r) = best(&|r| r.max_over_mean) {
        let _ = writeln!(
            out,
            "<div class=\"card\">best spread<b>{}</b>max/fair {:.3}</div>",
            escape(&r.policy),
            r.max_over_mean
        );
    }
    if let Some(r) = best(&|r| r.disruption()) {
        let _ = writeln!(
            out,
            "<div class=\"card\">least disruption<b>{}</b>{:.2}× the minimum moves</div>",
            escape(&r.policy),
            r.disruption()
        );
    }
    if let Some(r) = best(&|r| r.ns_per_decision.unwrap_or(f64::INFINITY)) {
        if let Some(ns) = r.ns_per_decision {
            let _ = writeln!(
                out,
                "<div class=\"card\">cheapest decision<b>{}</b>{ns:.0} ns</div>",
                escape(&r.policy)
            );
        }
    }
    if runs
        .iter()
        .any(|r| r.capacity_per_segw.iter().any(|&c| c > 0))
    {
        if let Some(r) = ranked(runs).first() {
            let _ = writeln!(
                out,
                "<div class=\"card\">refuses fewest<b>{}</b>{} tunnels refused (every segw full); \
                 {} answers of a full segw</div>",
                escape(&r.policy),
                r.refused_tunnels,
                r.full_answers
            );
        }
    }
    if runs.iter().any(PolicyRun::carries_traffic_load) {
        let coolest = ranked(runs).into_iter().min_by_key(|r| r.load_key());
        if let Some(r) = coolest {
            let _ = writeln!(
                out,
                "<div class=\"card\">carries the load best<b>{}</b>{} s over 100%, {} s over 80%; \
                 hottest segw at {:.0}%</div>",
                escape(&r.policy),
                r.seconds_over_100,
                r.seconds_over_80,
                r.peak_utilization_max() * 100.0
            );
        }
        let over: Vec<String> = ranked(runs)
            .into_iter()
            .filter(|r| r.seconds_over_100 > 0)
            .map(|r| format!("{} {} s", escape(&r.policy), r.seconds_over_100))
            .collect();
        if !over.is_empty() {
            let _ = writeln!(
                out,
                "<div class=\"card bad\">a segw asked to carry more than it can encrypt<b>{} of {} policies</b>{}</div>",
                over.len(),
                runs.len(),
                over.join(", ")
            );
        }
    }
    for r in runs
        .iter()
        .filter(|r| r.split_tunnels > 0 || r.fallbacks > r.full_answers)
    {
        let _ = writeln!(
            out,
            "<div class=\"card bad\">{}<b>{} split, {} fallbacks</b>tunnels broken / policy failures</div>",
            escape(&r.policy),
            r.split_tunnels,
            r.fallbacks
        );
    }
    out.push_str("</div>\n");
    out
}

fn table(runs: &[PolicyRun]) -> String {
    let capacities = runs
        .iter()
        .any(|r| r.capacity_per_segw.iter().any(|&c| c > 0));
    let mut out = String::from(
        "<table><tr><th>rank</th><th>policy</th><th>max/fair</th><th>cov</th>\
         <th>moved / minimum</th><th>split</th><th>ns/decision</th><th>fallbacks</th>",
    );
    if capacities {
        out.push_str(
            "<th>refused</th><th>answers of a full segw</th><th>peak / capacity (s at ≥ 90%)</th>",
        );
    }
    let load = runs.iter().any(PolicyRun::carries_traffic_load);
    if load {
        out.push_str(
            "<th>s &gt; 80%</th><th>s &gt; 100%</th><th>bytes max/mean (busy hour)</th>\
             <th>peak utilization per segw</th>",
        );
    }
    out.push_str("</tr>\n");
    for (i, r) in ranked(runs).iter().enumerate() {
        let moved: u64 = r.moved_per_event.iter().sum();
        let minimum: u64 = r.minimum_moved_per_event.iter().sum();
        let ns = r
            .ns_per_decision
            .map_or_else(|| "–".to_string(), |ns| format!("{ns:.0}"));
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.1}%</td><td>{moved} / {minimum}</td>\
             <td>{}</td><td>{ns}</td><td>{}</td>",
            i + 1,
            escape(&r.policy),
            r.max_over_mean,
            r.cov * 100.0,
            r.split_tunnels,
            r.fallbacks
        );
        if capacities {
            let _ = write!(
                out,
                "<td>{} ({} tries)</td><td>{}</td><td>{}</td>",
                r.refused_tunnels,
                r.refused_tries,
                r.full_answers,
                escape(&r.peak_cells().join(", "))
            );
        }
        if load {
            let peaks: Vec<String> = r
                .segws
                .iter()
                .map(|n| escape(&format!("{n} {:.0}%", r.peak_utilization[n] * 100.0)))
                .collect();
            let _ = write!(
                out,
                "<td>{}</td><td>{}</td><td>{:.3}</td><td class=\"cells\">{}</td>",
                r.seconds_over_80,
                r.seconds_over_100,
                r.throughput_max_over_mean,
                peaks.join("<br>")
            );
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    out
}

fn figure(svg: Result<String, String>) -> String {
    match svg {
        Ok(svg) => format!("<figure>{svg}</figure>\n"),
        Err(e) => format!("<p class=\"bad\">chart failed: {}</p>\n", escape(&e)),
    }
}

/// One policy: a line per segw, tunnels against simulated time.
fn load_over_time(scenario: &Scenario, run: &PolicyRun) -> Result<String, String> {
    let series: Vec<Vec<f64>> = (0..run.segws.len())
        .map(|g| run.tunnels_over_time.iter().map(|c| c[g] as f64).collect())
        .collect();
    over_time(scenario, &run.policy, "tunnels", &series, &[], &|y| {
        format!("{y:.0}")
    })
}

/// One policy: a line per segw, the traffic it carried (Gbit/s, both ways)
/// against simulated time, and its throughput capacity as a faint line of
/// its colour.
fn throughput_over_time(scenario: &Scenario, run: &PolicyRun) -> Result<String, String> {
    let gbps = |bytes: f64| bytes * 8.0 / 1e9;
    let series: Vec<Vec<f64>> = (0..run.segws.len())
        .map(|g| {
            run.throughput_over_time
                .iter()
                .map(|step| gbps(step[g]))
                .collect()
        })
        .collect();
    let levels: Vec<(usize, f64)> = run
        .throughput_capacity_per_segw
        .iter()
        .enumerate()
        .filter(|(_, &t)| t > 0)
        .map(|(g, &t)| (g, gbps(t as f64)))
        .collect();
    over_time(scenario, &run.policy, "Gbit/s", &series, &levels, &|y| {
        format!("{y:.1}")
    })
}

/// A line per segw (`series[g]`, one value per step) against simulated
/// time, events as grey lines, and `levels` (segw, value) as faint lines
/// of the segw's colour.
fn over_time(
    scenario: &Scenario,
    caption: &str,
    y_desc: &str,
    series: &[Vec<f64>],
    levels: &[(usize, f64)],
    y_fmt: &dyn Fn(&f64) -> String,
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (540, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let step = scenario.step_secs as f64;
        let steps = series.iter().map(Vec::len).max().unwrap_or(0);
        let end = steps.max(1) as f64 * step;
        let highest = series
            .iter()
            .flatten()
            .chain(levels.iter().map(|(_, l)| l))
            .copied()
            .fold(0.0, f64::max);
        let top = if highest > 0.0 { highest * 1.15 } else { 1.0 };
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..end, 0f64..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("simulated time (s)")
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(y_fmt)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, e) in scenario.events.iter().enumerate() {
            let x = f64::from(e.step) * step;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, 0.0), (x, top)],
                    BLACK.mix(0.25).stroke_width(1),
                )))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("[{}]", i + 1),
                    (x, top * 0.98),
                    ("sans-serif", 11),
                )))
                .map_err(|e| e.to_string())?;
        }
        for &(g, level) in levels {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(0.0, level), (end, level)],
                    colour(g).mix(0.6).stroke_width(1),
                )))
                .map_err(|e| e.to_string())?;
        }
        for (g, values) in series.iter().enumerate() {
            let points = values
                .iter()
                .enumerate()
                .map(|(s, &v)| ((s + 1) as f64 * step, v));
            chart
                .draw_series(LineSeries::new(points, colour(g).stroke_width(2)))
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// The segws' colours, once for all the load charts.
fn segw_legend(runs: &[PolicyRun]) -> String {
    let mut out = String::from("<p class=\"legend\">");
    if let Some(run) = runs.first() {
        for (g, name) in run.segws.iter().enumerate() {
            let RGBColor(r, gr, b) = colour(g);
            let _ = write!(
                out,
                "<span><i style=\"background:rgb({r},{gr},{b})\"></i>{}</span>",
                escape(name)
            );
        }
    }
    out.push_str("</p>\n");
    out
}

/// Per event, a bar per policy (moved) and a mark (the minimum).
fn disruption(scenario: &Scenario, runs: &[PolicyRun]) -> Result<String, String> {
    let events = scenario.events.len();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1060, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let top = runs
            .iter()
            .flat_map(|r| r.moved_per_event.iter().chain(&r.minimum_moved_per_event))
            .copied()
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..events.max(1) as f64, 0f64..top)
            .map_err(|e| e.to_string())?;
        let labels: Vec<String> = scenario
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| format!("[{}] {}", i + 1, e.label()))
            .collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(events.max(1) * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 1e-6 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("tunnels moved")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|e| e.to_string())?;
        let width = 0.8 / runs.len().max(1) as f64;
        for (p, run) in runs.iter().enumerate() {
            let c = colour(p);
            let bars = run.moved_per_event.iter().enumerate().map(|(e, &m)| {
                let x0 = e as f64 + 0.1 + p as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, m as f64)], c.filled())
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(run.policy.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
            let marks = run
                .minimum_moved_per_event
                .iter()
                .enumerate()
                .map(|(e, &m)| {
                    let x0 = e as f64 + 0.1 + p as f64 * width;
                    PathElement::new(
                        vec![(x0, m as f64), (x0 + width * 0.9, m as f64)],
                        BLACK.stroke_width(3),
                    )
                });
            chart.draw_series(marks).map_err(|e| e.to_string())?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Per policy, a bar per segw: tunnels over the fair share by weight.
fn final_spread(runs: &[PolicyRun]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1060, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let ratios: Vec<Vec<f64>> = runs.iter().map(spread).collect();
        let top = ratios
            .iter()
            .flatten()
            .copied()
            .fold(1.0, f64::max)
            .max(1.0)
            * 1.2;
        let mut chart = ChartBuilder::on(&root)
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..runs.len().max(1) as f64, 0f64..top)
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = ranked(runs).iter().map(|r| r.policy.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(runs.len().max(1) * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 1e-6 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("tunnels / fair share")
            .draw()
            .map_err(|e| e.to_string())?;
        let order = ranked(runs);
        for (p, run) in order.iter().enumerate() {
            let r = spread(run);
            let width = 0.8 / r.len().max(1) as f64;
            for (g, ratio) in r.iter().enumerate() {
                let x0 = p as f64 + 0.1 + g as f64 * width;
                let bar =
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *ratio)], colour(g).filled());
                chart
                    .draw_series(std::iter::once(bar))
                    .map_err(|e| e.to_string())?;
            }
        }
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, 1.0), (runs.len() as f64, 1.0)],
                BLACK.stroke_width(1),
            )))
            .map_err(|e| e.to_string())?;
        // No legend inside: five segws' worth of it covered the bars. The
        // page's segw legend (same colours) goes above the chart.
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn legend(chart: &mut Chart, position: SeriesLabelPosition) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| e.to_string())
}

/// Tunnels over the fair share per segw at the end (0 for segws taking none).
fn spread(run: &PolicyRun) -> Vec<f64> {
    let end = run.tunnels_over_time.last().cloned().unwrap_or_default();
    super::sim::fair_shares(&end, &run.weights_at_end)
        .iter()
        .zip(&end)
        .map(|(f, &c)| if *f > 0.0 { c as f64 / f } else { 0.0 })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
