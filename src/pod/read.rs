//! The bounded reader: serde visitors that keep only the fields [`super::Pod`] holds, scan past
//! everything else, and cut or drop what is over the limits.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::*;

/// `deserialize_with` for a review's `object` / `oldObject`: absent or `null` → `None`, else
/// the Pod as read (a value that is no object reads as a Pod with nothing in it).
pub fn pruned<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pod>, D::Error> {
    Ok(match Member::<PodFields>::deserialize(d)? {
        Member::Absent | Member::Null => None,
        Member::Read(PodFields(pod)) => Some(pod),
        Member::Odd => Some(Pod {
            metadata: Member::Odd,
            spec: Member::Odd,
        }),
    })
}

/// `deserialize_with` for a request's short strings (name, namespace): a string, cut past
/// [`MAX_TEXT`]; anything else reads as nothing.
pub fn short_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(TextVisitor)
}

// ---------------------------------------------------------------------------------------------
// The reader: a visitor per shape, each keeping only what it names.

/// How an object is read: each member by its key, the rest skipped.
trait Fields: Default {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error>;
}

/// Objects read by their [`Fields`], lists item by item; the shape a member must have is the
/// one its type implements, and every other one reads as [`Member::Odd`].
trait Shape: Sized {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        skip_map(map).map(|_| None)
    }
    fn from_seq<'de, A: SeqAccess<'de>>(seq: A) -> Result<Option<Self>, A::Error> {
        skip_seq(seq).map(|_| None)
    }
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Reads an object's members into `T`.
fn read_fields<'de, T: Fields, A: MapAccess<'de>>(mut map: A) -> Result<T, A::Error> {
    let mut t = T::default();
    while let Some(Key(key)) = map.next_key()? {
        t.field(&key, &mut map)?;
    }
    Ok(t)
}

impl<'de, T: Shape> Deserialize<'de> for Member<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MemberVisitor(PhantomData))
    }
}

struct MemberVisitor<T>(PhantomData<T>);

impl<'de, T: Shape> Visitor<'de> for MemberVisitor<T> {
    type Value = Member<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(T::from_map(map)?.map_or(Member::Odd, Member::Read))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Ok(T::from_seq(seq)?.map_or(Member::Odd, Member::Read))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Member::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Member::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Member::Odd)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Member::Odd)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Member::Odd)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Member::Odd)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Member::Odd)
    }
}

/// An object key, borrowed from the body unless JSON escapes made it another string.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A string kept (cut past [`MAX_TEXT`]); any other value reads as `None`.
struct TextVisitor;

pub(super) fn cut(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_string();
    }
    let mut end = CUT_TO;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(cut(v)))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|_| None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|_| None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
}

struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(TextVisitor)
    }
}

fn text<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<String>, A::Error> {
    map.next_value_seed(Text)
}

fn member<'de, T: Shape, A: MapAccess<'de>>(map: &mut A) -> Result<Member<T>, A::Error> {
    map.next_value::<Member<T>>()
}

/// The Pod itself.
#[derive(Default)]
struct PodFields(Pod);

impl Fields for PodFields {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "metadata" => self.0.metadata = member(map)?,
            "spec" => self.0.spec = member(map)?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl Shape for PodFields {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        read_fields(map).map(Some)
    }
}

impl Fields for Metadata {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "name" => self.name = text(map)?,
            "generateName" => self.generate_name = text(map)?,
            "namespace" => self.namespace = text(map)?,
            "labels" => {
                self.inject = match member::<Labels, A>(map)? {
                    Member::Read(l) => l.inject,
                    _ => None,
                }
            }
            "annotations" => self.annotations = member(map)?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl Shape for Metadata {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        read_fields(map).map(Some)
    }
}

#[derive(Default)]
struct Labels {
    inject: Option<String>,
}

impl Fields for Labels {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        if key == INJECT_LABEL {
            self.inject = text(map)?;
        } else {
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

impl Shape for Labels {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        read_fields(map).map(Some)
    }
}

impl Fields for Annotations {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        self.any = true;
        if key == ORIGINAL_IMAGES_ANNOTATION {
            self.original_images = text(map)?;
        } else {
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

impl Shape for Annotations {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        read_fields(map).map(Some)
    }
}

impl Fields for Spec {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        if key == "imagePullSecrets" {
            self.pull_secrets = member(map)?;
            return Ok(());
        }
        match ImageSite::ALL.iter().find(|s| s.field() == key) {
            Some(&site) => {
                let read = map.next_value_seed(SlotsSeed(site))?;
                self.images[site.slot()] = read;
            }
            None => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl Shape for Spec {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        read_fields(map).map(Some)
    }
}

/// One list of image slots; anything but a list reads as none.
struct SlotsSeed(ImageSite);

impl<'de> DeserializeSeed<'de> for SlotsSeed {
    type Value = Slots;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Slots, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SlotsSeed {
    type Value = Slots;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Slots, A::Error> {
        let mut slots = Slots::default();
        let mut index = 0;
        loop {
            if slots.items.len() >= MAX_IMAGES {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    break;
                }
                slots.overflow = true;
                continue;
            }
            let Some(item) = seq.next_element::<Member<Item>>()? else {
                break;
            };
            let image = match item {
                Member::Read(Item {
                    name,
                    image: Some(image),
                }) => match (image, self.0) {
                    (ItemImage::Volume(Some(i)), ImageSite::Volumes) => Some((name, i)),
                    (ItemImage::Container(Some(i)), site) if site != ImageSite::Volumes => {
                        Some((name, i))
                    }
                    _ => None,
                },
                _ => None,
            };
            if let Some((name, image)) = image {
                slots.items.push(Slot { index, name, image });
            }
            index += 1;
        }
        Ok(slots)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Slots, A::Error> {
        skip_map(map).map(|_| Slots::default())
    }
    fn visit_unit<E>(self) -> Result<Slots, E> {
        Ok(Slots::default())
    }
    fn visit_none<E>(self) -> Result<Slots, E> {
        Ok(Slots::default())
    }
    fn visit_bool<E>(self, _: bool) -> Result<Slots, E> {
        Ok(Slots::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Slots, E> {
        Ok(Slots::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Slots, E> {
        Ok(Slots::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Slots, E> {
        Ok(Slots::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<Slots, E> {
        Ok(Slots::default())
    }
}

/// One list item: a container (`image`: a string) or a volume (`image.reference`: a string).
#[derive(Default)]
struct Item {
    name: Option<String>,
    image: Option<ItemImage>,
}

impl Fields for Item {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "name" => self.name = text(map)?,
            "image" => self.image = Some(map.next_value::<ItemImage>()?),
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl Shape for Item {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        read_fields(map).map(Some)
    }
}

/// An item's `image`: a container's string, or a volume's `{reference: string}`.
enum ItemImage {
    Container(Option<String>),
    Volume(Option<String>),
}

impl<'de> Deserialize<'de> for ItemImage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ItemImage;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<ItemImage, E> {
                Ok(ItemImage::Container(Some(cut(v))))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ItemImage, A::Error> {
                let v: VolumeImage = read_fields(map)?;
                Ok(ItemImage::Volume(v.reference))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<ItemImage, A::Error> {
                skip_seq(seq).map(|_| ItemImage::Container(None))
            }
            fn visit_unit<E>(self) -> Result<ItemImage, E> {
                Ok(ItemImage::Container(None))
            }
            fn visit_none<E>(self) -> Result<ItemImage, E> {
                Ok(ItemImage::Container(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<ItemImage, E> {
                Ok(ItemImage::Container(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<ItemImage, E> {
                Ok(ItemImage::Container(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<ItemImage, E> {
                Ok(ItemImage::Container(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<ItemImage, E> {
                Ok(ItemImage::Container(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Default)]
struct VolumeImage {
    reference: Option<String>,
}

impl Fields for VolumeImage {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        if key == "reference" {
            self.reference = text(map)?;
        } else {
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

impl Shape for PullSecrets {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut p = PullSecrets::default();
        loop {
            if p.entries >= MAX_PULL_SECRETS {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    break;
                }
                p.overflow = true;
                p.entries += 1;
                continue;
            }
            let Some(entry) = seq.next_element::<Member<SecretRef>>()? else {
                break;
            };
            if let Member::Read(SecretRef { name: Some(name) }) = entry {
                p.names.push(name);
            }
            p.entries += 1;
        }
        Ok(Some(p))
    }
}

#[derive(Default)]
struct SecretRef {
    name: Option<String>,
}

impl Fields for SecretRef {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        if key == "name" {
            self.name = text(map)?;
        } else {
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

impl Shape for SecretRef {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        read_fields(map).map(Some)
    }
}
