"""Procurement on govmesh's public API: a requester drafts a purchase with a model and asks
the buyer, who plans it, waits for the vendor's quote on a durable timer, and places the
order through the ERP tool, every order governed by the seed policy."""
