//! The zoo's models: parameter counts against the reference implementations, the paper's layer
//! policy, and a forward and backward pass.

use int8_core::dclr::Dclr;
use int8_nn::policy::{LayerPolicy, Rule};
use int8_nn::precision::Int8Config;
use int8_nn::{Layer, Tensor};
use int8_zoo::{MODELS, build};

fn param_count(m: &dyn int8_zoo::Model) -> usize {
    m.param_count()
}

#[test]
fn resnet20_has_the_reference_parameter_count() {
    let m = build("resnet20", 10, &LayerPolicy::fp32(), 0).unwrap();
    assert_eq!(param_count(m.as_ref()), 272_474);
    // Deeper CIFAR ResNets add 2 blocks per stage per 12 layers of depth.
    let r32 = param_count(build("resnet32", 10, &LayerPolicy::fp32(), 0).unwrap().as_ref());
    let r56 = param_count(build("resnet56", 10, &LayerPolicy::fp32(), 0).unwrap().as_ref());
    assert_eq!(r32 - 272_474, r56 - r32 - (r32 - 272_474));
    let names: Vec<String> = m.trainables().iter().map(|t| t.param.name().to_string()).collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "parameter names must be unique");
    assert!(MODELS.contains(&"resnet20"));
    // torchvision's ImageNet ResNets and MobileNetV2 with 1000 classes.
    for (name, want) in [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)] {
        assert_eq!(param_count(build(name, 1000, &LayerPolicy::fp32(), 0).unwrap().as_ref()), want, "{name}");
    }
    assert_eq!(param_count(build("mobilenetv2", 1000, &LayerPolicy::fp32(), 0).unwrap().as_ref()), 3_504_872);
    // torchvision's AlexNet (conv biases included) and Inception v3 without the auxiliary head.
    assert_eq!(param_count(build("alexnet", 1000, &LayerPolicy::fp32(), 0).unwrap().as_ref()), 61_100_840);
    let inception = build("inceptionv3", 1000, &LayerPolicy::fp32(), 0).unwrap();
    assert_eq!(param_count(inception.as_ref()), 23_834_568);
    // 94 convolutions, each with its batch norm; the stem convolution and the classifier FP32.
    let count = |f: fn(&Layer) -> bool| inception.layers().iter().filter(|l| f(l)).count();
    let kinds = (
        count(|l| matches!(l, Layer::Conv(_))),
        count(|l| matches!(l, Layer::BatchNorm(_))),
        count(|l| matches!(l, Layer::Linear(_))),
    );
    assert_eq!(kinds, (94, 94, 1));
    let int8 = build("inceptionv3", 1000, &LayerPolicy::paper(Int8Config::default()), 0).unwrap();
    let names: Vec<String> = int8.int8_stats().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 93);
    assert!(!names.iter().any(|n| n == "Conv2d_1a_3x3.conv" || n == "fc"));
    assert!(build("resnet19", 10, &LayerPolicy::fp32(), 0).unwrap_err().to_string().contains("resnet19"));
}

#[test]
fn the_paper_policy_keeps_only_the_last_linear_layer_in_fp32() {
    let m = build("alexnet", 1000, &LayerPolicy::paper(Int8Config::default()), 0).unwrap();
    let int8: Vec<String> = m.int8_stats().into_iter().map(|(n, _)| n).collect();
    assert!(int8.iter().any(|n| n == "fc6") && int8.iter().any(|n| n == "fc7"), "{int8:?}");
    assert!(!int8.iter().any(|n| n == "fc8" || n == "conv1"), "{int8:?}");
    assert_eq!(int8.len(), 4 + 2);
}

#[test]
fn the_paper_policy_keeps_the_stem_and_classifier_in_fp32() {
    let m = build("resnet20", 10, &LayerPolicy::paper(Int8Config::default()), 0).unwrap();
    let int8: Vec<String> = m.int8_stats().into_iter().map(|(n, _)| n).collect();
    // 21 convolutions (stem, 18 in blocks, 2 projection shortcuts), all but the stem in INT8.
    assert_eq!(int8.len(), 20);
    assert!(!int8.iter().any(|n| n == "conv1" || n == "fc"));
    assert!(int8.iter().any(|n| n == "layer2.0.shortcut.conv"));
}

#[test]
fn a_layer_rule_that_matches_no_layer_is_an_error_naming_it() {
    let rule = |pattern: &str| LayerPolicy {
        rules: vec![Rule { pattern: pattern.into(), int8: false }],
        ..LayerPolicy::paper(Int8Config::default())
    };
    // MobileNetV2's depthwise layers; ResNet-20 has none, so the rule is most likely a mistake.
    let m = build("mobilenetv2-cifar", 10, &rule("*.dw.conv"), 0).unwrap();
    assert_eq!(m.int8_stats().len(), 51 - 17);
    let e = build("resnet20", 10, &rule("*.dw.conv"), 0).unwrap_err().to_string();
    assert!(e.contains("`*.dw.conv` matches no conv or linear layer of resnet20"), "{e}");
    assert!(e.contains("`conv1`"), "names some layers: {e}");
    assert!(build("resnet20", 10, &rule("layer3.*"), 0).is_ok());
}

#[test]
fn models_run_forward_and_backward_at_both_precisions() {
    for (name, input) in
        [("resnet20", (4, 3, 32, 32)), ("cnn-small", (4, 1, 28, 28)), ("mobilenetv2-cifar", (2, 3, 32, 32))]
    {
        for policy in [LayerPolicy::fp32(), LayerPolicy::paper(Int8Config::default())] {
            let m = build(name, 10, &policy, 1).unwrap();
            let x = Tensor::randn(input, 3);
            let logits = m.forward(&x).unwrap();
            assert_eq!(logits.dims(), &[input.0, 10]);
            let labels: Vec<u32> = (0..input.0 as u32).collect();
            let (loss, _) = int8_nn::ops::cross_entropy(&logits, &labels).unwrap();
            let grads = loss.backward().unwrap();
            for t in m.trainables() {
                let g = grads.of(t.param).unwrap_or_else(|| panic!("no gradient for {}", t.param.name())).to_vec();
                let norm: f64 = g.iter().map(|&v| f64::from(v).powi(2)).sum();
                assert!(norm.is_finite() && norm > 0.0, "{}: gradient norm {norm}", t.param.name());
            }
            // After a step every INT8 layer has statistics: a gradient that lost something to
            // quantization, and DCLR's multiplier of exactly that loss, which the optimizer gets.
            let scales: std::collections::HashMap<String, f64> =
                m.trainables().iter().map(|t| (t.param.name().to_string(), t.lr_scale)).collect();
            for (layer, st) in m.int8_stats() {
                assert_eq!(st.steps, 1, "{name} {layer}");
                assert!(st.distance > 0.0, "{name} {layer}: {st:?}");
                assert_eq!(st.phi, Dclr::default().phi(st.distance), "{name} {layer}");
                assert_eq!(scales[&format!("{layer}.weight")], st.phi, "{name} {layer}");
            }
        }
    }
}
