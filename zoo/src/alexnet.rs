//! AlexNet (Krizhevsky et al., NeurIPS 2012) in torchvision's single-tower layout: five
//! convolutions with biases and ReLU, three max pools, and three fully connected layers with
//! dropout; 61,100,840 parameters at 1000 classes. The paper (Zhu et al., CVPR 2020, Table 4)
//! trains it in INT8 on ImageNet. Under its default policy the first convolution and the last
//! fully connected layer stay FP32; fc6 and fc7 run in INT8 (`quant.linear_int8` and rules change
//! that).

use int8_nn::layers::{Conv2d, Dropout, Linear};
use int8_nn::ops::{avg_pool2d, max_pool2d, relu};
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{Layer, Module, Tensor};

use crate::blocks::Builder;
use crate::{Model, Result, ZooError, init};

/// AlexNet.
#[derive(Debug)]
pub struct AlexNet {
    /// 3 -> 64, 11x11, stride 4.
    pub conv1: Conv2d,
    /// 64 -> 192, 5x5.
    pub conv2: Conv2d,
    /// 192 -> 384, 3x3.
    pub conv3: Conv2d,
    /// 384 -> 256, 3x3.
    pub conv4: Conv2d,
    /// 256 -> 256, 3x3.
    pub conv5: Conv2d,
    /// Dropout before fc6.
    pub drop6: Dropout,
    /// 9216 -> 4096.
    pub fc6: Linear,
    /// Dropout before fc7.
    pub drop7: Dropout,
    /// 4096 -> 4096.
    pub fc7: Linear,
    /// 4096 -> classes.
    pub fc8: Linear,
}

impl AlexNet {
    /// AlexNet for `classes` classes.
    pub fn new(classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let mut b = Builder { policy, seed, count: 0 };
        let conv = |b: &mut Builder, name: &str, inp, out, k, stride, pad, first| -> Result<Conv2d> {
            let c = b.conv_rect(name, inp, out, (k, k), stride, (pad, pad), first)?;
            let bias = init::uniform(out, 1.0 / ((inp * k * k) as f32).sqrt(), b.next_seed())?;
            Ok(c.with_bias(bias)?)
        };
        let conv1 = conv(&mut b, "conv1", 3, 64, 11, 4, 2, true)?;
        let conv2 = conv(&mut b, "conv2", 64, 192, 5, 1, 2, false)?;
        let conv3 = conv(&mut b, "conv3", 192, 384, 3, 1, 1, false)?;
        let conv4 = conv(&mut b, "conv4", 384, 256, 3, 1, 1, false)?;
        let conv5 = conv(&mut b, "conv5", 256, 256, 3, 1, 1, false)?;
        let fc = |b: &mut Builder, name: &str, inp, out, last| -> Result<Linear> {
            let (w, bias) = init::linear(out, inp, b.next_seed())?;
            Ok(Linear::new(name, w, bias, policy.precision_for(name, LayerKind::Linear { last }))?)
        };
        let fc6 = fc(&mut b, "fc6", 256 * 6 * 6, 4096, false)?;
        let fc7 = fc(&mut b, "fc7", 4096, 4096, false)?;
        let fc8 = fc(&mut b, "fc8", 4096, classes, true)?;
        Ok(Self {
            conv1,
            conv2,
            conv3,
            conv4,
            conv5,
            drop6: Dropout::new("drop6", 0.5, b.next_seed())?,
            fc6,
            drop7: Dropout::new("drop7", 0.5, b.next_seed())?,
            fc7,
            fc8,
        })
    }
}

impl Model for AlexNet {
    fn name(&self) -> &str {
        "alexnet"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = max_pool2d(&relu(&self.conv1.forward(x)?)?, 3, 2, 0)?;
        let h = max_pool2d(&relu(&self.conv2.forward(&h)?)?, 3, 2, 0)?;
        let h = relu(&self.conv3.forward(&h)?)?;
        let h = relu(&self.conv4.forward(&h)?)?;
        let h = max_pool2d(&relu(&self.conv5.forward(&h)?)?, 3, 2, 0)?;
        // torchvision's adaptive average pool to 6x6, for planes that are whole multiples of 6
        // (6x6 itself at 224x224 inputs).
        let side = h.dims()[2];
        let h = match side {
            6 => h,
            s if s % 6 == 0 && h.dims()[3] == s => avg_pool2d(&h, s / 6, s / 6, 0)?,
            _ => {
                return Err(ZooError::Nn(int8_nn::NnError::BadInput {
                    layer: "alexnet".into(),
                    why: format!("the feature map is {:?}; feed 224x224 images", h.dims()),
                }));
            }
        };
        let h = h.flatten_from(1)?;
        let h = relu(&self.fc6.forward(&self.drop6.forward(&h)?)?)?;
        let h = relu(&self.fc7.forward(&self.drop7.forward(&h)?)?)?;
        Ok(self.fc8.forward(&h)?)
    }
}

impl Module for AlexNet {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        for c in [&self.conv1, &self.conv2, &self.conv3, &self.conv4, &self.conv5] {
            c.visit(f);
        }
        self.drop6.visit(f);
        self.fc6.visit(f);
        self.drop7.visit(f);
        self.fc7.visit(f);
        self.fc8.visit(f);
    }
}
