//! `int8-datasets`: IDX, CIFAR binary, image-folder and detection formats, discovery, augmentation
//! and batching. Not yet written: see the project's datasets issue.
