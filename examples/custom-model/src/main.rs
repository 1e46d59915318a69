//! Runs the custom-model example: a 3-client FedAvg simulation of
//! [`tally_examples::TwoPath`] on the MNIST sample embedded in the binary,
//! printing each round's test accuracy and model hash.

fn main() -> anyhow::Result<()> {
    let split = tally_kernels::data::embedded_mnist();
    let report = tally_examples::simulate(&split, 3, 5)?;
    for r in &report.records {
        println!(
            "round {:>2}  accuracy {:>6}  hash {}",
            r.round,
            r.test_accuracy.map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
            r.model_hash
        );
    }
    Ok(())
}
