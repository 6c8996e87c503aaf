// The two programs of the test images (stdlib only, built static): the pause process every
// sandbox runs, and the test server the Kubernetes tests schedule.
module podwire.test/images

go 1.25.0
