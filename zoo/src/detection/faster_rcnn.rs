//! Faster R-CNN (Ren et al., NeurIPS 2015) on ResNet-50-FPN, as torchvision's
//! `fasterrcnn_resnet50_fpn` builds it. (Being written.)
