//! `--plot FILE.svg`: the run's timeline as an SVG chart (`plotters`, SVG backend only). Top:
//! set-up latency p50 and p99 per second; bottom: calls started, answered and failed per
//! second. Text is written as SVG `<text>` and laid out with plotters' built-in size estimate,
//! so no font files or system libraries are needed: the viewer draws the labels with its own
//! fonts. It reads a finished report and draws; it measures nothing.

use std::path::Path;

use plotters::prelude::*;

use super::report::LoadReport;

/// The chart could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("plot: {0}")]
pub struct PlotError(String);

fn err(e: impl std::fmt::Display) -> PlotError {
    PlotError(e.to_string())
}

/// Renders the chart as SVG text.
pub fn render_svg(report: &LoadReport) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically(320);
        let seconds = (report.timeline.len() as u64).saturating_sub(1).max(1);

        let max_latency = report
            .timeline
            .iter()
            .map(|s| s.setup_p99_ms)
            .fold(0.0f64, f64::max)
            .max(0.1);
        let mut latency = ChartBuilder::on(&top)
            .caption(
                format!(
                    "call set-up latency, {} devices, {} calls/s asked",
                    report.devices_connected, report.target_cps
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..seconds, 0f64..max_latency * 1.15)
            .map_err(err)?;
        latency
            .configure_mesh()
            .x_desc("second of the run")
            .y_desc("set-up ms")
            .draw()
            .map_err(err)?;
        for (name, color, pick) in [("p50", BLUE, 0usize), ("p99", RED, 1usize)] {
            latency
                .draw_series(LineSeries::new(
                    report.timeline.iter().filter(|s| s.answered > 0).map(|s| {
                        (
                            s.second,
                            if pick == 0 {
                                s.setup_p50_ms
                            } else {
                                s.setup_p99_ms
                            },
                        )
                    }),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        latency
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;

        let max_rate = report
            .timeline
            .iter()
            .map(|s| s.attempted.max(s.answered).max(s.failed))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut rate = ChartBuilder::on(&bottom)
            .caption("calls per second", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..seconds, 0u64..max_rate + max_rate / 10 + 1)
            .map_err(err)?;
        rate.configure_mesh()
            .x_desc("second of the run")
            .y_desc("calls")
            .draw()
            .map_err(err)?;
        for (name, color, pick) in [
            ("started", BLUE, 0usize),
            ("answered", GREEN, 1usize),
            ("failed", RED, 2usize),
        ] {
            rate.draw_series(LineSeries::new(
                report.timeline.iter().map(|s| {
                    (
                        s.second,
                        match pick {
                            0 => s.attempted,
                            1 => s.answered,
                            _ => s.failed,
                        },
                    )
                }),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        rate.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Writes the chart to `path`.
pub fn write_svg(report: &LoadReport, path: &Path) -> Result<(), PlotError> {
    let svg = render_svg(report)?;
    std::fs::write(path, svg).map_err(|e| PlotError(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::report::{RunFacts, Tally};
    use std::time::{Duration, Instant};

    #[test]
    fn draws_labelled_lines_for_each_second() {
        let t0 = Instant::now();
        let mut tally = Tally::new(t0).unwrap();
        for i in 0..30u64 {
            let at = t0 + Duration::from_millis(i * 100);
            tally.started(at);
            tally.add(&crate::load::device_calls::Outcome::Answered {
                at,
                setup: Duration::from_micros(800 + i * 100),
            });
        }
        let report = tally.report(
            RunFacts {
                devices_connected: 5,
                target_cps: 10.0,
                ..Default::default()
            },
            Duration::from_secs(3),
            false,
        );
        let svg = render_svg(&report).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("<polyline"), "no lines drawn");
        for label in [
            "set-up ms",
            "calls per second",
            "p99",
            "answered",
            "5 devices",
        ] {
            assert!(svg.contains(label), "missing label {label}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.svg");
        write_svg(&report, &path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), svg);
    }

    #[test]
    fn an_empty_run_still_draws() {
        let report =
            Tally::new(Instant::now())
                .unwrap()
                .report(RunFacts::default(), Duration::ZERO, false);
        assert!(render_svg(&report).unwrap().contains("calls per second"));
    }
}
