//! Object detection datasets: Pascal VOC (one XML file per image, Everingham et al. 2010) and
//! COCO (one JSON file per split, Lin et al. 2014), read into one form: images with their sizes
//! and boxes `[x1, y1, x2, y2]` in pixels, the image spanning `[0, width] x [0, height]`. Every box
//! is checked against its image: a box with `x2 < x1` or `y2 < y1`, or one outside the image by
//! more than a pixel, is an error naming the file and the box. Transforms for training (resize,
//! horizontal flip) move the boxes with the pixels.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::imageops::{FilterType, resize};
use serde::Deserialize;

use crate::decoded::DecodedImage;
use crate::{DatasetError, Result, io_err};

/// The twenty Pascal VOC classes, in the order of their labels.
pub const VOC_CLASSES: [&str; 20] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// Boxes may stick out of their image by this many pixels (rounding in the annotation tools);
/// they are clipped to it. Farther out is an error.
const TOLERANCE: f64 = 1.0;

/// One annotated object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Label: an index into the set's classes.
    pub class: u32,
    /// `[x1, y1, x2, y2]` in pixels, `x1 < x2`, `y1 < y2`, inside the image.
    pub bbox: [f32; 4],
    /// VOC's `difficult` flag, or COCO's `iscrowd`: kept, and usually left out of evaluation.
    pub difficult: bool,
}

/// One image and its objects.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionItem {
    /// The image file.
    pub image: PathBuf,
    /// Width in pixels, as annotated.
    pub width: u32,
    /// Height in pixels, as annotated.
    pub height: u32,
    /// Its objects.
    pub objects: Vec<Object>,
}

/// A detection split.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionSet {
    /// Class names in label order.
    pub classes: Vec<String>,
    /// Images with their objects.
    pub items: Vec<DetectionItem>,
    /// Boxes of zero width or height, left out (COCO has a few).
    pub empty_boxes: usize,
}

fn invalid(path: &Path, why: impl Into<String>) -> DatasetError {
    DatasetError::Invalid { path: path.into(), why: why.into() }
}

/// Checks a box `[x1, y1, x2, y2]` against a `width x height` image and clips it by at most
/// [`TOLERANCE`]; `Ok(None)` for a box of zero width or height.
fn check_box(path: &Path, what: &str, b: [f64; 4], width: u32, height: u32) -> Result<Option<[f32; 4]>> {
    let [x1, y1, x2, y2] = b;
    if b.iter().any(|v| !v.is_finite()) {
        return Err(invalid(path, format!("{what} has a coordinate that is not a number: {b:?}")));
    }
    if x2 < x1 || y2 < y1 {
        return Err(invalid(
            path,
            format!("{what} is inverted (x1 {x1}, y1 {y1}, x2 {x2}, y2 {y2}): x2 < x1 or y2 < y1; fix the annotation"),
        ));
    }
    let (w, h) = (width as f64, height as f64);
    if x1 < -TOLERANCE || y1 < -TOLERANCE || x2 > w + TOLERANCE || y2 > h + TOLERANCE {
        return Err(invalid(
            path,
            format!("{what} [{x1}, {y1}, {x2}, {y2}] lies outside its {width}x{height} image; fix the annotation"),
        ));
    }
    let clipped = [x1.clamp(0.0, w), y1.clamp(0.0, h), x2.clamp(0.0, w), y2.clamp(0.0, h)];
    if clipped[2] <= clipped[0] || clipped[3] <= clipped[1] {
        return Ok(None);
    }
    Ok(Some(clipped.map(|v| v as f32)))
}

/// The text of child element `name` of `node`.
fn child_text<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> Option<&'a str> {
    node.children().find(|c| c.has_tag_name(name)).and_then(|c| c.text()).map(str::trim)
}

/// A number in child element `name` of `node`, or an error naming the element.
fn child_num(path: &Path, node: roxmltree::Node<'_, '_>, name: &str) -> Result<f64> {
    let text = child_text(node, name)
        .ok_or_else(|| invalid(path, format!("has no <{name}> in <{}>", node.tag_name().name())))?;
    text.parse::<f64>().map_err(|_| invalid(path, format!("<{name}> is {text:?}, not a number")))
}

/// Parses one VOC annotation (`path` is only for messages); the image is `image_dir/<filename>`.
/// Classes are looked up in [`VOC_CLASSES`].
pub fn parse_voc(path: &Path, text: &str, image_dir: &Path) -> Result<DetectionItem> {
    let class_of = |name: &str| VOC_CLASSES.iter().position(|c| *c == name).map(|i| i as u32);
    parse_voc_classes(path, text, image_dir, &class_of, "the 20 VOC classes")
}

/// [`parse_voc`] with a dataset's own classes: `class_of` gives the label of a class name, `None`
/// for a name the dataset does not have (an error naming the file, the object and `known`).
pub fn parse_voc_classes(
    path: &Path,
    text: &str,
    image_dir: &Path,
    class_of: &dyn Fn(&str) -> Option<u32>,
    known: &str,
) -> Result<DetectionItem> {
    let doc = roxmltree::Document::parse(text).map_err(|e| invalid(path, format!("is not valid XML ({e})")))?;
    let root = doc.root_element();
    if !root.has_tag_name("annotation") {
        return Err(invalid(path, format!("has root <{}>, not a VOC <annotation>", root.tag_name().name())));
    }
    let file = child_text(root, "filename").ok_or_else(|| invalid(path, "has no <filename>"))?;
    if file.is_empty() || Path::new(file).components().count() != 1 {
        return Err(invalid(path, format!("<filename> {file:?} is not a plain file name")));
    }
    let size = root.children().find(|c| c.has_tag_name("size")).ok_or_else(|| invalid(path, "has no <size>"))?;
    let (w, h) = (child_num(path, size, "width")?, child_num(path, size, "height")?);
    if !(w >= 1.0 && h >= 1.0 && w <= 65_535.0 && h <= 65_535.0) {
        return Err(invalid(path, format!("<size> is {w}x{h}, not an image size")));
    }
    let (width, height) = (w as u32, h as u32);
    let mut objects = Vec::new();
    for (k, obj) in root.children().filter(|c| c.has_tag_name("object")).enumerate() {
        let name = child_text(obj, "name").ok_or_else(|| invalid(path, format!("object {k} has no <name>")))?;
        let class = class_of(name)
            .ok_or_else(|| invalid(path, format!("object {k} has class {name:?}, which is not one of {known}")))?;
        let bb = obj
            .children()
            .find(|c| c.has_tag_name("bndbox"))
            .ok_or_else(|| invalid(path, format!("object {k} has no <bndbox>")))?;
        // VOC's corners are 1-based and inclusive: pixel columns xmin..=xmax.
        let b = [
            child_num(path, bb, "xmin")? - 1.0,
            child_num(path, bb, "ymin")? - 1.0,
            child_num(path, bb, "xmax")?,
            child_num(path, bb, "ymax")?,
        ];
        let difficult = child_text(obj, "difficult").is_some_and(|d| d == "1");
        let bbox = check_box(path, &format!("object {k} ({name})"), b, width, height)?
            .ok_or_else(|| invalid(path, format!("object {k} ({name}) has an empty box")))?;
        objects.push(Object { class, bbox, difficult });
    }
    Ok(DetectionItem { image: image_dir.join(file), width, height, objects })
}

/// Reads a VOC split: the ids in `root/ImageSets/Main/<split>.txt`, their annotations in
/// `root/Annotations/<id>.xml` and images in `root/JPEGImages/`.
pub fn read_voc(root: &Path, split: &str) -> Result<DetectionSet> {
    read_voc_classes(root, split, &VOC_CLASSES)
}

/// [`read_voc`] for a dataset of its own classes, labelled in the order given.
pub fn read_voc_classes(root: &Path, split: &str, classes: &[&str]) -> Result<DetectionSet> {
    let class_of = |name: &str| classes.iter().position(|c| *c == name).map(|i| i as u32);
    let known = format!("its classes ({})", classes.join(", "));
    let list = root.join("ImageSets/Main").join(format!("{split}.txt"));
    let ids = std::fs::read_to_string(&list).map_err(io_err(&list))?;
    let image_dir = root.join("JPEGImages");
    let mut items = Vec::new();
    for id in ids.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = root.join("Annotations").join(format!("{id}.xml"));
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let item = parse_voc_classes(&path, &text, &image_dir, &class_of, &known)?;
        if !item.image.is_file() {
            return Err(invalid(&item.image, format!("is missing; {} names it", path.display())));
        }
        items.push(item);
    }
    if items.is_empty() {
        return Err(invalid(&list, "lists no images"));
    }
    Ok(DetectionSet { classes: classes.iter().map(|c| c.to_string()).collect(), items, empty_boxes: 0 })
}

/// A VOC annotation of `objects` in image `file` (`width x height`), the inverse of
/// [`parse_voc_classes`]: corners written 1-based and inclusive, classes by name.
pub fn voc_xml(file: &str, width: u32, height: u32, objects: &[Object], classes: &[&str]) -> String {
    let escape = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut x = format!(
        "<annotation>\n  <filename>{}</filename>\n  <size><width>{width}</width><height>{height}</height>\
         <depth>3</depth></size>\n",
        escape(file)
    );
    for o in objects {
        let [x1, y1, x2, y2] = o.bbox;
        x.push_str(&format!(
            "  <object><name>{}</name><difficult>{}</difficult>\n    <bndbox><xmin>{}</xmin><ymin>{}</ymin>\
             <xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>\n",
            escape(classes[o.class as usize]),
            u8::from(o.difficult),
            x1 + 1.0,
            y1 + 1.0,
        ));
    }
    x + "</annotation>\n"
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    #[serde(default)]
    iscrowd: u8,
}

#[derive(Deserialize)]
struct CocoCategory {
    id: u64,
    name: String,
}

/// Parses a COCO instances file (`path` is only for messages); images are in `image_dir`.
/// Labels are the categories in the order of their ids.
pub fn parse_coco(path: &Path, bytes: &[u8], image_dir: &Path) -> Result<DetectionSet> {
    let file: CocoFile =
        serde_json::from_slice(bytes).map_err(|e| invalid(path, format!("is not a COCO instances file ({e})")))?;
    let mut cats: Vec<&CocoCategory> = file.categories.iter().collect();
    cats.sort_by_key(|c| c.id);
    let mut label = HashMap::new();
    for (l, c) in cats.iter().enumerate() {
        if label.insert(c.id, l as u32).is_some() {
            return Err(invalid(path, format!("category id {} appears twice", c.id)));
        }
    }
    let mut index = HashMap::new();
    let mut items = Vec::with_capacity(file.images.len());
    for img in &file.images {
        if img.width == 0 || img.height == 0 {
            return Err(invalid(
                path,
                format!("image {} ({}) has size {}x{}", img.id, img.file_name, img.width, img.height),
            ));
        }
        if img.file_name.is_empty()
            || Path::new(&img.file_name).components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(invalid(
                path,
                format!("image {} has file_name {:?}, not a relative path", img.id, img.file_name),
            ));
        }
        if index.insert(img.id, items.len()).is_some() {
            return Err(invalid(path, format!("image id {} appears twice", img.id)));
        }
        items.push(DetectionItem {
            image: image_dir.join(&img.file_name),
            width: img.width,
            height: img.height,
            objects: Vec::new(),
        });
    }
    let mut empty_boxes = 0;
    for a in &file.annotations {
        let &i = index.get(&a.image_id).ok_or_else(|| {
            invalid(path, format!("annotation {} names image {}, which is not listed", a.id, a.image_id))
        })?;
        let &class = label.get(&a.category_id).ok_or_else(|| {
            invalid(path, format!("annotation {} has category {}, which is not listed", a.id, a.category_id))
        })?;
        let [x, y, w, h] = a.bbox;
        let item = &mut items[i];
        let what = format!("annotation {} (image {})", a.id, a.image_id);
        match check_box(path, &what, [x, y, x + w, y + h], item.width, item.height)? {
            Some(bbox) => item.objects.push(Object { class, bbox, difficult: a.iscrowd != 0 }),
            None => empty_boxes += 1,
        }
    }
    Ok(DetectionSet { classes: cats.iter().map(|c| c.name.clone()).collect(), items, empty_boxes })
}

/// Reads a COCO instances file with its images in `image_dir`.
pub fn read_coco(annotations: &Path, image_dir: &Path) -> Result<DetectionSet> {
    let bytes = std::fs::read(annotations).map_err(io_err(annotations))?;
    parse_coco(annotations, &bytes, image_dir)
}

/// Mirrors boxes left-right in an image `width` pixels wide.
pub fn flip_boxes(objects: &mut [Object], width: f32) {
    for o in objects {
        let [x1, y1, x2, y2] = o.bbox;
        o.bbox = [width - x2, y1, width - x1, y2];
    }
}

/// Scales boxes by `sx` horizontally and `sy` vertically.
pub fn scale_boxes(objects: &mut [Object], sx: f32, sy: f32) {
    for o in objects {
        let [x1, y1, x2, y2] = o.bbox;
        o.bbox = [x1 * sx, y1 * sy, x2 * sx, y2 * sy];
    }
}

/// Detection's resize: the scale that brings the shorter side to `min_side` unless the longer
/// side would then pass `max_side` (Ren et al. 2015: 600 and 1000), applied to pixels and boxes,
/// then a horizontal flip of both when `flip`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectionResize {
    /// Target of the shorter side.
    pub min_side: u32,
    /// Limit of the longer side.
    pub max_side: u32,
}

impl DetectionResize {
    /// Decodes `item`'s image (checking it against the annotated size), resizes it and its boxes,
    /// and mirrors both when `flip`.
    pub fn load(&self, item: &DetectionItem, flip: bool) -> Result<(DecodedImage, Vec<Object>)> {
        let bytes = std::fs::read(&item.image).map_err(io_err(&item.image))?;
        let img = image::load_from_memory(&bytes)
            .map_err(|e| invalid(&item.image, format!("does not decode as an image ({e}); delete or replace it")))?
            .to_rgb8();
        if (img.width(), img.height()) != (item.width, item.height) {
            return Err(invalid(
                &item.image,
                format!("is {}x{}, but its annotation says {}x{}", img.width(), img.height(), item.width, item.height),
            ));
        }
        let (w, h) = (item.width as f64, item.height as f64);
        let mut scale = self.min_side as f64 / w.min(h);
        if w.max(h) * scale > self.max_side as f64 {
            scale = self.max_side as f64 / w.max(h);
        }
        let (nw, nh) = (((w * scale).round() as u32).max(1), ((h * scale).round() as u32).max(1));
        let mut out = resize(&img, nw, nh, FilterType::Triangle);
        let mut objects = item.objects.clone();
        scale_boxes(&mut objects, (nw as f64 / w) as f32, (nh as f64 / h) as f32);
        if flip {
            image::imageops::flip_horizontal_in_place(&mut out);
            flip_boxes(&mut objects, nw as f32);
        }
        Ok((DecodedImage { width: nw as usize, height: nh as usize, data: out.into_raw() }, objects))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VOC: &str = r#"<annotation>
  <folder>VOC2007</folder>
  <filename>000001.jpg</filename>
  <size><width>353</width><height>500</height><depth>3</depth></size>
  <object><name>dog</name><pose>Left</pose><truncated>1</truncated><difficult>0</difficult>
    <bndbox><xmin>48</xmin><ymin>240</ymin><xmax>195</xmax><ymax>371</ymax></bndbox></object>
  <object><name>person</name><difficult>1</difficult>
    <bndbox><xmin>8</xmin><ymin>12</ymin><xmax>352</xmax><ymax>498</ymax></bndbox></object>
</annotation>"#;

    const COCO: &str = r#"{
  "info": {"description": "fixture"},
  "images": [{"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
             {"id": 9, "file_name": "b.jpg", "width": 20, "height": 20}],
  "annotations": [
    {"id": 1, "image_id": 7, "category_id": 18, "bbox": [2.5, 3.0, 10.0, 12.0], "iscrowd": 0, "area": 120},
    {"id": 2, "image_id": 9, "category_id": 1, "bbox": [0.0, 0.0, 20.4, 20.0], "iscrowd": 1},
    {"id": 3, "image_id": 9, "category_id": 1, "bbox": [5.0, 5.0, 0.0, 3.0]}
  ],
  "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]
}"#;

    #[test]
    fn voc_annotations_become_zero_based_boxes_with_checks() {
        let p = Path::new("Annotations/000001.xml");
        let item = parse_voc(p, VOC, Path::new("JPEGImages")).unwrap();
        assert_eq!(item.image, Path::new("JPEGImages/000001.jpg"));
        assert_eq!((item.width, item.height), (353, 500));
        assert_eq!(item.objects.len(), 2);
        assert_eq!(item.objects[0], Object { class: 11, bbox: [47.0, 239.0, 195.0, 371.0], difficult: false });
        assert_eq!(item.objects[1].class, 14);
        assert!(item.objects[1].difficult);
        let bad = |from: &str, to: &str| parse_voc(p, &VOC.replace(from, to), Path::new(".")).unwrap_err().to_string();
        let e = bad("<xmax>195</xmax>", "<xmax>20</xmax>");
        assert!(e.contains("000001.xml") && e.contains("x2 < x1"), "{e}");
        let e = bad("<ymax>371</ymax>", "<ymax>900</ymax>");
        assert!(e.contains("outside its 353x500 image"), "{e}");
        assert!(bad("<name>dog</name>", "<name>dragon</name>").contains("dragon"));
        assert!(bad("<xmin>48</xmin>", "<xmin>4 8</xmin>").contains("not a number"));
        assert!(bad("<filename>000001.jpg", "<filename>../000001.jpg").contains("plain file name"));
        assert!(bad("</annotation>", "").contains("not valid XML"));
    }

    #[test]
    fn written_voc_annotations_read_back_to_the_same_objects() {
        let objects = vec![
            Object { class: 1, bbox: [0.0, 3.0, 17.5, 20.0], difficult: false },
            Object { class: 0, bbox: [5.0, 6.0, 40.0, 30.0], difficult: true },
        ];
        let text = voc_xml("a&b.png", 40, 30, &objects, &["x<y", "tree"]);
        let class_of = |n: &str| ["x<y", "tree"].iter().position(|c| *c == n).map(|i| i as u32);
        let item = parse_voc_classes(Path::new("a.xml"), &text, Path::new("img"), &class_of, "x<y, tree").unwrap();
        assert_eq!(item, DetectionItem { image: PathBuf::from("img/a&b.png"), width: 40, height: 30, objects });
        let e = parse_voc_classes(
            Path::new("a.xml"),
            &text.replace(">tree<", ">bush<"),
            Path::new(""),
            &class_of,
            "x<y, tree",
        );
        assert!(e.unwrap_err().to_string().contains("class \"bush\", which is not one of x<y, tree"));
    }

    #[test]
    fn coco_annotations_get_labels_in_id_order_and_checked_boxes() {
        let p = Path::new("instances_val.json");
        let set = parse_coco(p, COCO.as_bytes(), Path::new("val")).unwrap();
        assert_eq!(set.classes, vec!["person", "dog"]);
        assert_eq!(set.items.len(), 2);
        assert_eq!(set.items[0].image, Path::new("val/a.jpg"));
        assert_eq!(set.items[0].objects, vec![Object { class: 1, bbox: [2.5, 3.0, 12.5, 15.0], difficult: false }]);
        // Within a pixel of the border is clipped; a zero-width box is counted and left out.
        assert_eq!(set.items[1].objects, vec![Object { class: 0, bbox: [0.0, 0.0, 20.0, 20.0], difficult: true }]);
        assert_eq!(set.empty_boxes, 1);
        let bad = |from: &str, to: &str| {
            parse_coco(p, COCO.replace(from, to).as_bytes(), Path::new(".")).unwrap_err().to_string()
        };
        let e = bad("[2.5, 3.0, 10.0, 12.0]", "[2.5, 3.0, -10.0, 12.0]");
        assert!(e.contains("instances_val.json") && e.contains("x2 < x1"), "{e}");
        assert!(bad("[2.5, 3.0, 10.0, 12.0]", "[35.0, 3.0, 10.0, 12.0]").contains("outside its 40x30 image"));
        assert!(bad("\"image_id\": 7", "\"image_id\": 8").contains("not listed"));
        assert!(bad("\"category_id\": 18", "\"category_id\": 3").contains("category 3"));
        assert!(bad("\"a.jpg\"", "\"/etc/passwd\"").contains("not a relative path"));
        assert!(bad("\"images\"", "\"imgs\"").contains("not a COCO instances file"));
    }

    #[test]
    fn voc_folders_are_read_by_split_and_missing_images_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("ImageSets/Main")).unwrap();
        std::fs::create_dir_all(root.join("Annotations")).unwrap();
        std::fs::create_dir_all(root.join("JPEGImages")).unwrap();
        std::fs::write(root.join("ImageSets/Main/train.txt"), "000001\n").unwrap();
        std::fs::write(root.join("Annotations/000001.xml"), VOC).unwrap();
        let e = read_voc(root, "train").unwrap_err().to_string();
        assert!(e.contains("000001.jpg") && e.contains("missing"), "{e}");
        image::RgbImage::new(353, 500).save(root.join("JPEGImages/000001.jpg")).unwrap();
        let set = read_voc(root, "train").unwrap();
        assert_eq!((set.classes.len(), set.items.len()), (20, 1));
        assert!(read_voc(root, "val").unwrap_err().to_string().contains("val.txt"));
    }

    #[test]
    fn resize_and_flip_move_the_boxes_with_the_pixels() {
        // A white 10x10 square at x 10..20, y 5..15 of a black 40x20 image.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sq.png");
        let img = image::RgbImage::from_fn(40, 20, |x, y| {
            if (10..20).contains(&x) && (5..15).contains(&y) { image::Rgb([255; 3]) } else { image::Rgb([0; 3]) }
        });
        img.save(&path).unwrap();
        let item = DetectionItem {
            image: path,
            width: 40,
            height: 20,
            objects: vec![Object { class: 0, bbox: [10.0, 5.0, 20.0, 15.0], difficult: false }],
        };
        let t = DetectionResize { min_side: 40, max_side: 1000 };
        for flip in [false, true] {
            let (out, objs) = t.load(&item, flip).unwrap();
            assert_eq!((out.width, out.height), (80, 40));
            let want = if flip { [40.0, 10.0, 60.0, 30.0] } else { [20.0, 10.0, 40.0, 30.0] };
            assert_eq!(objs[0].bbox, want);
            // Pixels well inside the moved box are white, pixels well outside black.
            for y in 0..40usize {
                for x in 0..80usize {
                    let v = out.data[(y * 80 + x) * 3];
                    let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
                    let b = objs[0].bbox;
                    let inside = fx > b[0] + 2.0 && fx < b[2] - 2.0 && fy > b[1] + 2.0 && fy < b[3] - 2.0;
                    let outside = fx < b[0] - 2.0 || fx > b[2] + 2.0 || fy < b[1] - 2.0 || fy > b[3] + 2.0;
                    assert!(!inside || v == 255, "({x}, {y}) = {v}, flip {flip}");
                    assert!(!outside || v == 0, "({x}, {y}) = {v}, flip {flip}");
                }
            }
        }
        // The longer side is held to max_side.
        let (out, objs) = DetectionResize { min_side: 40, max_side: 60 }.load(&item, false).unwrap();
        assert_eq!((out.width, out.height, objs[0].bbox), (60, 30, [15.0, 7.5, 30.0, 22.5]));
        let wrong = DetectionItem { width: 41, ..item };
        assert!(t.load(&wrong, false).unwrap_err().to_string().contains("annotation says 41x20"));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_voc(Path::new("f.xml"), &text, Path::new("."));
            let _ = parse_coco(Path::new("f.json"), &bytes, Path::new("."));
        }

        #[test]
        fn mutated_annotations_never_panic(
            flips in proptest::collection::vec((0usize..2048, any::<u8>()), 1..8),
            cut in 0usize..2048,
        ) {
            for doc in [VOC, COCO] {
                let mut b = doc.as_bytes().to_vec();
                crate::mutate(&mut b, &flips);
                if cut % 2 == 0 && cut < b.len() {
                    b.truncate(cut);
                }
                let text = String::from_utf8_lossy(&b);
                let _ = parse_voc(Path::new("f.xml"), &text, Path::new("."));
                let _ = parse_coco(Path::new("f.json"), &b, Path::new("."));
            }
        }
    }
}
