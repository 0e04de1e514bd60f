//! What nests in a PDF, bounded: the page tree's `/Parent` links and form XObjects drawn inside
//! forms. In a damaged or hostile file both are graphs, not trees. pdf-extract follows them by
//! recursion without a bound (inherited page attributes, and its `Do` operator, which runs any
//! XObject it names), so a loop overflows the stack, and a form that draws the next one twice,
//! twenty levels deep, runs a million forms. Loops and absurd depths in the page tree are cut
//! when the file is opened ([`cut_parent_loops`]); the forms a page draws are checked before
//! pdf-extract sees the page ([`text_forms_fit`]), and the page-image walker
//! (page_image/mod.rs) spends the same [`FormBudget`].

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use pdf_extract::content::Content;
use pdf_extract::{Dictionary, Document, Object, ObjectId, Stream};

/// Forms drawn inside forms deeper than this are not followed.
const MAX_FORM_DEPTH: usize = 16;
/// Form content one page may run, counting a form each time it is drawn, and what drawing one
/// costs besides its content: about 8,000 empty forms or 32 MiB of content, well beyond what
/// real pages draw and a few seconds at most.
const FORM_BYTES_PER_PAGE: usize = 32 << 20;
const FORM_CALL_BYTES: usize = 4096;
/// Page-tree levels above a page; the specification's trees are a handful deep.
const MAX_TREE_DEPTH: usize = 64;

/// What one page may spend on drawing forms.
pub struct FormBudget {
    left: usize,
}

impl FormBudget {
    pub fn per_page() -> Self {
        Self { left: FORM_BYTES_PER_PAGE }
    }

    /// Spends what drawing a form of `len` content bytes at nesting `depth` (1: drawn by the
    /// page itself) costs, or says why it may not be drawn.
    pub fn enter(&mut self, depth: usize, len: usize) -> Result<(), String> {
        if depth > MAX_FORM_DEPTH {
            return Err(format!("form XObjects nest more than {MAX_FORM_DEPTH} deep (a form that draws itself?)"));
        }
        let cost = len.saturating_add(FORM_CALL_BYTES);
        if cost > self.left {
            return Err(format!(
                "form XObjects are drawn over and over (more than {} MiB of form content on one page)",
                FORM_BYTES_PER_PAGE >> 20
            ));
        }
        self.left -= cost;
        Ok(())
    }
}

/// Removes each `/Parent` link that closes a loop in the page tree, or that leads more than
/// [`MAX_TREE_DEPTH`] levels up, so that looking up an inherited attribute ends. Returns how
/// many links were cut.
pub fn cut_parent_loops(doc: &mut Document) -> usize {
    let mut cut = HashSet::new();
    for page in doc.page_iter() {
        let (mut node, mut seen) = (page, HashSet::from([page]));
        while let Some(parent) = parent(doc, node) {
            if !seen.insert(parent) || seen.len() > MAX_TREE_DEPTH {
                cut.insert(node);
                break;
            }
            node = parent;
        }
    }
    for id in &cut {
        if let Ok(d) = doc.get_dictionary_mut(*id) {
            d.remove(b"Parent");
        }
    }
    cut.len()
}

fn parent(doc: &Document, node: ObjectId) -> Option<ObjectId> {
    doc.get_dictionary(node).ok()?.get(b"Parent").ok()?.as_reference().ok()
}

/// The page's dictionary, then those of the nodes above it in the page tree, nearest first, for
/// as long as `/Parent` leads on (a loop included: callers take as many as they look at).
pub(super) fn ancestors(doc: &Document, page: ObjectId) -> impl Iterator<Item = &Dictionary> {
    std::iter::successors(Some(page), move |&node| parent(doc, node)).map_while(move |id| doc.get_dictionary(id).ok())
}

/// Checks that the forms the page draws, as pdf-extract draws them, stay within a
/// [`FormBudget`]; the error says why not.
pub fn text_forms_fit(doc: &Document, page: ObjectId) -> Result<(), String> {
    let empty = Dictionary::new();
    let resources = inherited_resources(doc, page).unwrap_or(&empty);
    // A page that names no XObject draws no form: its content need not be read twice.
    if xobject_table(doc, resources).is_none_or(|t| t.is_empty()) {
        return Ok(());
    }
    let Some(names) = doc.get_page_content(page).ok().and_then(|c| drawn(&c)) else { return Ok(()) };
    TextWalk { doc, budget: FormBudget::per_page(), forms: HashMap::new() }.visit(&names, resources, 0)
}

/// pdf-extract's walk over the forms of a page, without drawing anything: each form's content
/// is read once, and what it draws is remembered.
struct TextWalk<'a> {
    doc: &'a Document,
    budget: FormBudget,
    forms: HashMap<*const Stream, Rc<Form>>,
}

struct Form {
    /// Its content's length.
    len: usize,
    /// The XObjects it draws (`None`: content that does not parse, where pdf-extract stops the
    /// page).
    draws: Option<Vec<Vec<u8>>>,
}

impl<'a> TextWalk<'a> {
    fn visit(&mut self, names: &[Vec<u8>], resources: &'a Dictionary, depth: usize) -> Result<(), String> {
        let table = xobject_table(self.doc, resources);
        for name in names {
            // Where pdf-extract finds no XObject of that name it panics, which ends the page.
            let Some(form) = table.and_then(|t| t.get(name).ok()).and_then(|o| resolve(self.doc, o).as_stream().ok()) else {
                return Ok(());
            };
            let read = || {
                let content = form.decompressed_content().unwrap_or_else(|_| form.content.clone());
                Rc::new(Form { len: content.len(), draws: drawn(&content) })
            };
            let read = Rc::clone(self.forms.entry(form).or_insert_with(read));
            self.budget.enter(depth + 1, read.len)?;
            let Some(inner) = &read.draws else { return Ok(()) };
            let own = form.dict.get(b"Resources").ok().and_then(|r| resolve(self.doc, r).as_dict().ok());
            self.visit(inner, own.unwrap_or(resources), depth + 1)?;
        }
        Ok(())
    }
}

/// The names of the XObjects a content stream draws, in order, up to a `Do` without one (where
/// pdf-extract panics); `None` when the content does not parse.
fn drawn(content: &[u8]) -> Option<Vec<Vec<u8>>> {
    let ops = Content::decode(content).ok()?;
    let names = ops.operations.iter().filter(|o| o.operator == "Do").map(|o| o.operands.first().and_then(|n| n.as_name().ok()));
    Some(names.map_while(|n| n.map(<[u8]>::to_vec)).collect())
}

/// The page's resources as pdf-extract finds them: the nearest dictionary up the page tree.
fn inherited_resources(doc: &Document, page: ObjectId) -> Option<&Dictionary> {
    ancestors(doc, page).take(MAX_TREE_DEPTH + 1).find_map(|node| resolve(doc, node.get(b"Resources").ok()?).as_dict().ok())
}

fn xobject_table<'a>(doc: &'a Document, resources: &'a Dictionary) -> Option<&'a Dictionary> {
    resolve(doc, resources.get(b"XObject").ok()?).as_dict().ok()
}

/// What an object is: the object a reference points at, or the object itself.
pub(super) fn resolve<'a>(doc: &'a Document, o: &'a Object) -> &'a Object {
    match o {
        Object::Reference(id) => doc.get_object(*id).unwrap_or(o),
        o => o,
    }
}

#[cfg(test)]
mod tests {
    use pdf_extract::{Stream, dictionary};

    use super::*;

    /// A one-page document whose page draws `/F0 Do` and whose forms F0…F(n-1) are made by
    /// `form(i)`, all named in the page's resources.
    fn forms_page(n: usize, form: impl Fn(usize) -> String) -> (Document, ObjectId) {
        let mut doc = Document::with_version("1.5");
        let pages = doc.new_object_id();
        let ids: Vec<ObjectId> = (0..n).map(|_| doc.new_object_id()).collect();
        let mut table = Dictionary::new();
        for (i, id) in ids.iter().enumerate() {
            table.set(format!("F{i}"), *id);
        }
        for (i, id) in ids.iter().enumerate() {
            let d = dictionary! { "Type" => "XObject", "Subtype" => "Form", "BBox" => vec![0.into(), 0.into(), 10.into(), 10.into()] };
            doc.objects.insert(*id, Object::Stream(Stream::new(d, form(i).into_bytes())));
        }
        let contents = doc.add_object(Stream::new(Dictionary::new(), b"/F0 Do".to_vec()));
        let page = doc.add_object(dictionary! { "Type" => "Page", "Parent" => pages, "Contents" => contents,
        "MediaBox" => vec![0.into(), 0.into(), 10.into(), 10.into()], "Resources" => dictionary! { "XObject" => table } });
        doc.objects
            .insert(pages, Object::Dictionary(dictionary! { "Type" => "Pages", "Kids" => vec![page.into()], "Count" => 1 }));
        let catalog = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages });
        doc.trailer.set("Root", catalog);
        (doc, page)
    }

    #[test]
    fn forms_that_draw_themselves_or_fan_out_are_refused_and_a_shared_form_is_not() {
        let (doc, page) = forms_page(1, |_| "/F0 Do".into());
        assert!(text_forms_fit(&doc, page).unwrap_err().contains("more than 16 deep"));
        // Each form draws the next one twice: 2^15 forms drawn from 16 objects.
        let (doc, page) = forms_page(16, |i| if i < 15 { format!("/F{} Do /F{} Do", i + 1, i + 1) } else { String::new() });
        assert!(text_forms_fit(&doc, page).unwrap_err().contains("over and over"));
        // One form drawn 500 times by another, which is fine.
        let (doc, page) = forms_page(2, |i| if i == 0 { "/F1 Do ".repeat(500) } else { "BT ET".into() });
        text_forms_fit(&doc, page).unwrap();
    }

    #[test]
    fn a_page_tree_that_loops_is_cut_once() {
        let (mut doc, page) = forms_page(1, |_| String::new());
        let pages = parent(&doc, page).unwrap();
        doc.get_dictionary_mut(pages).unwrap().set("Parent", pages);
        assert_eq!(cut_parent_loops(&mut doc), 1);
        assert_eq!(parent(&doc, page), Some(pages), "the page keeps its parent");
        assert_eq!(parent(&doc, pages), None, "the link back is cut");
        assert_eq!(cut_parent_loops(&mut doc), 0);
    }

    fn extract(doc: &mut Document) -> super::super::Extracted {
        let mut bytes = Vec::new();
        doc.save_to(&mut bytes).unwrap();
        super::super::pdf::extract(&bytes, super::super::ExtractLimits { max_pages: 8 }).unwrap()
    }

    /// Each of these overflowed pdf-extract's stack before it was checked.
    #[test]
    fn text_extraction_survives_a_looping_page_tree_and_a_form_that_draws_itself() {
        let (mut doc, page) = forms_page(1, |_| String::new());
        let pages = parent(&doc, page).unwrap();
        // The inherited MediaBox is looked up through the loop.
        doc.get_dictionary_mut(page).unwrap().remove(b"MediaBox");
        doc.get_dictionary_mut(pages).unwrap().set("Parent", pages);
        let got = extract(&mut doc);
        assert!(got.warnings.iter().any(|w| w.contains("/Parent links")), "{:?}", got.warnings);

        let (mut doc, _) = forms_page(1, |_| "BT /F1 12 Tf (x) Tj ET /F0 Do".into());
        let got = extract(&mut doc);
        assert_eq!(got.pages.len(), 1);
        let refused = "page 1: text layer could not be read (form XObjects nest";
        assert!(got.warnings.iter().any(|w| w.contains(refused)), "{:?}", got.warnings);
    }
}
