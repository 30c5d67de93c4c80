"""moeyard.comm"""
